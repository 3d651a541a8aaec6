"""GRPO reasoning RL (DeepSeekMath §4.1, DeepSeek-R1 §2.2): what is particular to it, on the shared Trainer.

Each rollout: take prompts from a task, sample G completions of each with nanoseek's own engine (batched, KV
cached, seeded per sample), score them with the task's rule-based reward, and turn the rewards into
group-relative advantages. The rollout is then cut into the Trainer's micro-batches and used for μ optimizer
steps (`inner_updates`): from the second on, the policy has moved and the clipped ratio against the
log-probabilities recorded at rollout time does its work. The loss itself is grpo_loss.py.

DeepSeek-V3.2's stability options are opt-in flags (today's defaults unchanged): the unbiased KL and
off-policy sequence masking (grpo_loss.py), and here the two that need the rollout:
- keep sampling mask: the top-p/top-k set is *recomputed* from π_old's logits (the first pass over a rollout,
  whose weights sampled it) with the engine's own truncation rule, then kept for the μ − 1 later passes;
  π_θ, π_old and π_ref are all renormalised over it. The sampled token is always in it (the decode path and
  the training forward may round differently at the boundary). It is held as a [b, L-1, V] bool tensor per
  micro-batch (V bytes per position: 50 MB for 1,000 positions of a 50k vocabulary).
- keep routing: the rollout is generated with `record_routing`, and the loss forward replays those experts
  (Router.forced) at every position the decode loop computed, prompt included (a prompt computed once and
  copied to the group's other rows carries its record along). Positions it never fed (the last token,
  padding) route freely; they reach no loss term. Reference-model forwards route freely.

Under torchrun every rank rolls out its own share of prompts (a rank takes every W-th problem of the task's
stream), so generation — most of GRPO's time — scales with the ranks; gradients meet in DDP as usual.
"""

from __future__ import annotations

import copy
import itertools
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from nanoseek.engine.generate import Engine
from nanoseek.engine.sampling import Sampler, SamplerState, SamplingParams
from nanoseek.errors import BadInputError, UnsupportedError
from nanoseek.evaluate import completion_text, sample_seed
from nanoseek.tasks.base import GeneratedTask, Task
from nanoseek.tasks.prompts import Template
from nanoseek.tasks.tools import ToolTask, run_episodes
from nanoseek.train import distributed as D
from nanoseek.train.grpo_loss import group_advantages, grpo_loss, token_logprobs
from nanoseek.train.loop import Objective


@dataclass
class GRPOConfig:
    group_size: int = 8              # G completions per prompt
    prompts_per_step: int = 8        # prompts per rollout, over all ranks
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                   # 0: off
    inner_updates: int = 1           # μ optimizer steps per rollout
    eps_low: float = 0.2
    eps_high: float | None = None    # None: = eps_low; DAPO's clip-higher uses 0.28
    beta: float = 0.0                # k3 KL weight; 0 loads no reference model
    scale_rewards: str = "group"     # group | batch | none (Dr. GRPO)
    aggregation: str = "dapo"        # grpo | dapo | dr_grpo
    dynamic_sampling: bool = False   # DAPO: drop groups whose rewards are all equal, roll out more prompts
    max_rounds: int = 4              # rollout rounds dynamic sampling may take to fill a step
    template: str = "chat"
    open_think: bool = True
    gen_batch: int = 64              # completions decoded together
    cuda_graphs: bool = False        # rollouts decode through captured static-shape steps (CUDA only)
    seed: int = 0
    # DeepSeek-V3.2's stability options (module docstring), all off by default
    unbiased_kl: bool = False        # KL term ρ·k3 instead of k3 (needs beta > 0 to matter)
    offpolicy_threshold: float | None = None  # mask A<0 sequences whose mean log(π_old/π_θ) exceeds it
    keep_sampling_mask: bool = False  # renormalise over the rollout's top-p/top-k set (no-op without them)
    keep_routing: bool = False       # replay the rollout's MoE expert choices in the loss forward

    @property
    def records_behaviour(self) -> bool:
        """Off-policy masking takes π_old from the sampler: its reported log-probs are the raw model's, which
        is the sampling distribution only at temperature 1 without truncation (else the first pass's)."""
        return self.offpolicy_threshold is not None and self.temperature == 1.0 and not self.truncates

    def validate(self) -> GRPOConfig:
        if self.group_size < 2:
            raise BadInputError("group_size must be ≥ 2: advantages compare completions within a group")
        if self.prompts_per_step < 1 or self.inner_updates < 1 or self.max_new_tokens < 1:
            raise BadInputError("prompts_per_step, inner_updates and max_new_tokens must be ≥ 1")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise BadInputError(f"scale_rewards {self.scale_rewards!r}: group, batch or none")
        if self.aggregation not in ("grpo", "dapo", "dr_grpo"):
            raise BadInputError(f"aggregation {self.aggregation!r}: grpo, dapo or dr_grpo")
        if self.beta < 0 or self.eps_low <= 0 or (self.eps_high is not None and self.eps_high <= 0):
            raise BadInputError("beta must be ≥ 0 and the clip ranges > 0")
        if self.offpolicy_threshold is not None and not self.offpolicy_threshold >= 0:
            raise BadInputError("offpolicy_threshold must be ≥ 0 (a KL estimate), or unset")
        if self.temperature == 0:
            # Greedy rollouts make a group's completions identical (zero advantages), and the loss divides
            # the logits by the temperature.
            raise BadInputError("GRPO samples its completions: temperature must be > 0")
        # The rollouts' sampling rule, checked now rather than at the first rollout, after the model loads.
        self.sampling().validate()
        return self

    def sampling(self, **kw) -> SamplingParams:
        """The rollouts' sampling rule (the loss's keep sampling mask recomputes the same truncation)."""
        return SamplingParams(max_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, **kw)

    @property
    def truncates(self) -> bool:
        return self.top_p < 1 or self.top_k > 0


@dataclass
class RolloutBatch:
    """One micro-batch: right-padded prompt+completion ids [b, L]; mask [b, L-1] marks the positions whose
    next token is a completion token. old_logp / ref_logp are filled by the objective on the first pass (so
    they are computed under the same precision as the loss) and reused by the μ − 1 passes after it.
    token_norm: DAPO's divisor, the rollout's completion tokens over all ranks / (micro-batches × ranks), so
    that after the loop's accumulation average and DDP's rank average the loss is Σ tokens / N_global.
    routing [b, L, n_moe_layers, k]: the rollout's experts per position (-1: free), with keep_routing.
    sample_mask [b, L-1, V] bool: the rollout's top-p/top-k set, with keep_sampling_mask (first pass).
    behaviour_logp [b, L-1]: the sampler's log-prob of each completion token (NaN where none: the ending
    token, tool episodes), recorded for off-policy masking when the sampler's distribution is the policy's."""

    ids: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    token_norm: float | None = None
    routing: torch.Tensor | None = None
    sample_mask: torch.Tensor | None = None
    behaviour_logp: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}

    @classmethod
    def from_state(cls, state: dict[str, Any], device) -> RolloutBatch:
        return cls(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in state.items()})


class Row(NamedTuple):
    """One completion of a rollout, before micro-batching. own: a 0/1 mask over the completion of the model's own
    tokens (a tool episode's results carry no loss; None: all); routing: its record [P, n_layers, k] (keep
    routing); behaviour: the sampler's log-probs of the completion tokens (off-policy masking)."""

    prompt: list[int]
    completion: list[int]
    reward: float
    routing: torch.Tensor | None = None
    own: list[int] | None = None
    behaviour: list[float] | None = None

    def own_count(self) -> int:
        return sum(self.own) if self.own is not None else len(self.completion)


class GRPOObjective(Objective):
    """`reference`: the frozen starting policy, needed when β > 0."""

    name = "grpo"
    console_keys = ("reward", "accuracy", "format", "kl", "completion_len", "frac_reward_zero_std", "loss")

    def __init__(self, cfg: GRPOConfig, reference: nn.Module | None = None):
        if cfg.beta > 0 and reference is None:
            raise BadInputError("beta > 0 needs a reference model")
        self.cfg, self.reference = cfg, reference

    def _logp(self, logits: torch.Tensor, ids: torch.Tensor,
              allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # The log-probs of the distribution the completions were sampled from: logits / temperature.
        t = self.cfg.temperature
        return token_logprobs(logits[:, :-1] / t if t != 1.0 else logits[:, :-1], ids[:, 1:], allowed)

    def sampling_mask(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[B, T, V] logits of π_old → [B, T-1, V] bool: the tokens the rollout's top-p/top-k could draw at
        each position, by the engine's own rule (one copy of it), plus the token actually drawn."""
        x = logits[:, :-1].detach().float()
        flat = x.reshape(-1, x.shape[-1])
        state = SamplerState(self.cfg.sampling(), flat.shape[-1], device=flat.device)
        allowed = (Sampler([state] * flat.shape[0])._probs(flat) > 0).view_as(x)
        return allowed.scatter_(-1, ids[:, 1:, None], True)

    def loss(self, model: nn.Module, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.cfg
        with replay_routing(model, batch.routing if c.keep_routing else None):
            logits, _ = model(batch.ids)
        if c.keep_sampling_mask and c.truncates and batch.sample_mask is None:
            batch.sample_mask = self.sampling_mask(logits, batch.ids)  # first pass: these logits are π_old's
        logp, entropy = self._logp(logits, batch.ids, batch.sample_mask)
        if batch.old_logp is None:  # first pass over this rollout: the policy is still the one that sampled it
            batch.old_logp = logp.detach()
        if c.beta > 0 and batch.ref_logp is None:
            with torch.no_grad():
                batch.ref_logp = self._logp(self.reference(batch.ids), batch.ids, batch.sample_mask)[0]
        loss, m = grpo_loss(logp, batch.old_logp, batch.advantages, batch.mask, ref_logp=batch.ref_logp,
                            beta=c.beta, eps_low=c.eps_low, eps_high=c.eps_high, aggregation=c.aggregation,
                            max_len=c.max_new_tokens, num_tokens=batch.token_norm, unbiased_kl=c.unbiased_kl,
                            offpolicy_threshold=c.offpolicy_threshold, behaviour_logp=batch.behaviour_logp)
        n = batch.mask.sum().clamp(min=1)
        if c.beta == 0:
            m.pop("kl")   # no reference model, so no KL was measured: log none rather than a false 0
        metrics = {k: torch.tensor(v, device=logits.device) for k, v in {**m, **batch.stats}.items()}
        metrics["entropy"] = ((entropy * batch.mask).sum() / n).detach()
        return loss, metrics

    def tokens(self, batch: RolloutBatch) -> int:
        return int(batch.mask.sum())


class Rollouts:
    """The Trainer's batch source for GRPO: rolls out when the current rollout is used up."""

    batch_cls = RolloutBatch   # what a checkpoint's pending batches are rebuilt as

    def __init__(self, policy: nn.Module, tokenizer, task: Task, cfg: GRPOConfig, *, micro_batches: int,
                 rank: int = 0, world_size: int = 1):
        self._start(policy, tokenizer, task, cfg.validate(), micro_batches, rank, world_size)
        if cfg.prompts_per_step % world_size:
            raise BadInputError(f"--prompts-per-step {cfg.prompts_per_step} must divide among {world_size} "
                                "processes: make it a multiple of the process count")
        self.template = Template(cfg.template, cfg.open_think)
        self.engine = Engine(policy, tokenizer, max_batch=cfg.gen_batch, cuda_graphs=cfg.cuda_graphs)
        if cfg.keep_routing and not routers(policy):
            raise BadInputError("keep_routing replays top-k MoE routing: this model has no DeepSeek MoE router")

    def _start(self, policy: nn.Module, tokenizer, task: Task, cfg, micro_batches: int, rank: int,
               world_size: int) -> None:
        """The state every rollout source keeps, and state_dict saves. A source with its own config and rollout
        (onpolicy.OnPolicySource) starts from it too, so the problem stream and resume position stay one."""
        self.policy, self.tokenizer, self.task, self.cfg = policy, tokenizer, task, cfg
        self.micro_batches, self.rank, self.world = micro_batches, rank, world_size
        self.rollouts = 0          # rollouts made so far
        self.consumed = 0          # problems this rank has taken from its stream
        self._stream = self._problems()
        self._queue: list[RolloutBatch] = []

    # -- state (exact resume: same problems, same sampling seeds) -----------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Position in the problem stream, and the rollout still being trained on (μ > 1): its batches, each
        once, with their recorded log-probs, and the order of the passes left — so a resumed run finishes
        the same updates an uninterrupted one would."""
        unique: list[RolloutBatch] = []
        order = []
        for b in self._queue:
            i = next((j for j, u in enumerate(unique) if u is b), None)
            if i is None:
                unique.append(b)
                i = len(unique) - 1
            order.append(i)
        return {"rollouts": self.rollouts, "consumed": self.consumed, "pending": [b.state() for b in unique],
                "order": order}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollouts = state["rollouts"]
        self._stream = self._problems()
        for _ in range(state["consumed"]):
            next(self._stream)
        self.consumed = state["consumed"]
        device = next(self.policy.parameters()).device
        pending = [self.batch_cls.from_state(b, device) for b in state.get("pending", [])]
        self._queue = [pending[i] for i in state.get("order", [])]

    def _problems(self):
        """This rank's endless problem stream: every W-th train problem; a finite task restarts, reshuffled."""
        if isinstance(self.task, GeneratedTask) or getattr(self.task, "endless", False):  # endless and seeded
            yield from itertools.islice(self.task.iter_problems("train"), self.rank, None, self.world)
            return
        problems = list(self.task.iter_problems("train"))
        if not problems:
            raise BadInputError(f"task {self.task.name}: the train split is empty")
        for epoch in itertools.count():
            order = problems.copy()
            random.Random(f"{self.cfg.seed}/{epoch}").shuffle(order)
            yield from order[self.rank::self.world] or order[:1]

    # -- batches ------------------------------------------------------------------------------------------

    def next_batch(self) -> RolloutBatch:
        if not self._queue:
            self._queue = self._collect() * self.cfg.inner_updates
        return self._queue.pop(0)

    @torch.no_grad()
    def _collect(self) -> list[RolloutBatch]:
        cfg, G = self.cfg, self.cfg.group_size
        t0 = time.perf_counter()
        want = cfg.prompts_per_step // self.world
        kept: list[list[Row]] = []
        last_round: list[list[Row]] = []
        rewards_all, acc, fmt, lengths, truncated, tool_calls, zero_std = [], [], [], [], [], [], 0
        was_training = self.policy.training
        self.policy.eval()
        for _ in range(cfg.max_rounds if cfg.dynamic_sampling else 1):
            last_round = []
            problems = [next(self._stream) for _ in range(want)]
            self.consumed += want
            params = [cfg.sampling(stop=list(self.template.stop),
                                   seed=sample_seed(cfg.seed, f"{self.rollouts}/{p.id}", g),
                                   logprobs=0 if cfg.records_behaviour else None)
                      for p in problems for g in range(G)]
            played = self._play(problems, params)
            for i in range(len(problems)):
                group = []
                for prompt, completion, r, own, routing, n, finish, calls, behaviour in played[i * G:(i + 1) * G]:
                    routing = torch.stack(routing) if routing else None
                    group.append(Row(prompt, completion, r.total, routing, own, behaviour))
                    rewards_all.append(r.total)
                    acc.append(r.accuracy)
                    fmt.append(r.format)
                    lengths.append(n)
                    truncated.append(finish == "length")
                    tool_calls.append(calls)
                flat = len({row.reward for row in group}) == 1
                zero_std += flat
                last_round.append(group)
                if not (cfg.dynamic_sampling and flat):
                    kept.append(group)
            if len(kept) >= want:
                break
        if was_training:
            self.policy.train()
        if len(kept) < want:  # too few groups with signal: fill up with the last round's (zero advantage), so
            # every rank has the same number of rows to split into micro-batches
            # (by identity: a group's rows may hold routing tensors, which == cannot compare)
            kept += [g for g in last_round if not any(g is k for k in kept)][:want - len(kept)]
        kept = kept[:want]
        self.rollouts += 1
        n_groups = len(rewards_all) // G
        stats = {"reward": _mean(rewards_all), "accuracy": _mean(acc), "format": _mean(fmt),
                 "completion_len": _mean(lengths), "truncated": _mean(truncated),
                 "frac_reward_zero_std": zero_std / max(n_groups, 1),
                 "rollout_s": time.perf_counter() - t0}   # generation + rewards: GRPO's usual bottleneck
        if isinstance(self.task, ToolTask):
            stats["tool_calls"] = _mean(tool_calls)
        rows = [row for group in kept for row in group]
        adv = group_advantages(torch.tensor([row.reward for row in rows]), G, cfg.scale_rewards)
        tokens = D.all_reduce_sum(torch.tensor([float(sum(row.own_count() for row in rows))]))
        norm = float(tokens) / (self.micro_batches * self.world)
        return self._micro_batches(rows, adv, stats, norm)

    def _play(self, problems, params) -> list[tuple]:
        """G completions (or tool episodes) per problem → per row (prompt ids, completion ids, reward,
        own-token mask over the completion or None for all, routing record, own tokens, finish, tool calls,
        the sampler's log-probs of the completion tokens or None)."""
        G, cfg = self.cfg.group_size, self.cfg
        if isinstance(self.task, ToolTask):
            if cfg.template != "chat":
                raise BadInputError("tool tasks render conversations with the chat template: --template chat")
            eps = run_episodes(self.engine.generate, self.tokenizer, self.task,
                               [p for p in problems for _ in range(G)], params, open_think=cfg.open_think,
                               record_routing=cfg.keep_routing, context=self.engine.context)
            return [(e.ids[:e.prompt_len], e.ids[e.prompt_len:], e.score(self.task), e.own[e.prompt_len:],
                     e.routing, e.own_tokens, e.finish_reason, e.calls, None) for e in eps]
        prompts = [self.template.render(self.tokenizer, p) for p in problems]
        outs = self.engine.generate([pr.ids for pr in prompts for _ in range(G)], params,
                                    record_routing=cfg.keep_routing)
        rows = []
        for k, out in enumerate(outs):
            p, pr = problems[k // G], prompts[k // G]
            completion = out.sampled_ids
            text = completion_text(self.tokenizer, out, self.template.stop)
            r = self.task.reward(text, p, started_in_think=pr.starts_in_reasoning, num_tokens=len(out.token_ids))
            behaviour = [lp["logprob"] for lp in out.logprobs] if out.logprobs is not None else None
            rows.append((pr.ids, completion, r, None, out.routing, len(out.token_ids), out.finish_reason, 0,
                         behaviour))
        return rows

    def _micro_batches(self, rows: list[Row], adv, stats, token_norm: float | None = None) -> list[RolloutBatch]:
        device = next(self.policy.parameters()).device
        order = list(range(len(rows)))
        chunks = [order[i::self.micro_batches] for i in range(self.micro_batches)]
        if any(not c for c in chunks):
            raise BadInputError(f"{len(rows)} completions cannot fill {self.micro_batches} micro-batches: "
                                "lower --grad-accum, or raise --prompts-per-step × --group-size")
        out = []
        pad = self.engine.eos_token_ids[0] if self.engine.eos_token_ids else 0
        for chunk in chunks:
            seqs = [rows[i].prompt + rows[i].completion for i in chunk]
            L = max(len(s) for s in seqs)
            ids = torch.full((len(chunk), L), pad, dtype=torch.long)
            mask = torch.zeros(len(chunk), L - 1)
            for b, i in enumerate(chunk):
                prompt, completion = rows[i].prompt, rows[i].completion
                ids[b, :len(prompt) + len(completion)] = torch.tensor(prompt + completion)
                own = rows[i].own if rows[i].own is not None else [1] * len(completion)
                # Only the model's own tokens: a tool episode's results and turn glue carry no loss.
                mask[b, len(prompt) - 1:len(prompt) - 1 + len(completion)] = torch.tensor(own, dtype=mask.dtype)
            ids, mask = ids.to(device), mask.to(device)
            routing = _routing([rows[i].routing for i in chunk], L)
            behaviour = None
            if any(rows[i].behaviour is not None for i in chunk):
                behaviour = torch.full((len(chunk), L - 1), float("nan"))
                for b, i in enumerate(chunk):
                    lps = rows[i].behaviour
                    if lps:
                        start = len(rows[i].prompt) - 1
                        behaviour[b, start:start + len(lps)] = torch.tensor(lps)
                behaviour = behaviour.to(device)
            out.append(RolloutBatch(ids, mask, adv[chunk].to(device), token_norm=token_norm, stats=stats,
                                    routing=routing, behaviour_logp=behaviour))
        return out


def _routing(records: list[torch.Tensor | None], length: int) -> torch.Tensor | None:
    """Per-row routing records [P_i, n_layers, k] → [b, length, n_layers, k], -1 where none was recorded."""
    if not any(r is not None for r in records):
        return None
    shape = next(r for r in records if r is not None).shape[1:]
    out = torch.full((len(records), length, *shape), -1, dtype=torch.long)
    for b, r in enumerate(records):
        if r is not None:
            n = min(len(r), length)
            out[b, :n] = r[:n]
    return out


def routers(model: nn.Module) -> list:
    """The top-k routers in module order: the order the engine's routing record lists MoE layers in."""
    from nanoseek.models.moe import Router

    return [m for m in model.modules() if isinstance(m, Router)]


@contextmanager
def replay_routing(model: nn.Module, routing: torch.Tensor | None):
    """Within the block, model forwards over [b, L] tokens route as `routing` [b, L, n_layers, k] says
    (V3.2 keep routing); rows of -1 choose freely. The first n_layers routers are the main stack's, the
    ones the decode loop ran; MTP modules (not run when decoding) route freely."""
    if routing is None:
        yield
        return
    layers = routers(model)[:routing.shape[2]]
    if len(layers) < routing.shape[2]:
        raise BadInputError(f"the routing record has {routing.shape[2]} MoE layers, the model {len(layers)}")
    try:
        for i, router in enumerate(layers):
            router.forced = routing[:, :, i].reshape(-1, routing.shape[-1])
        yield
    finally:
        for router in layers:
            router.forced = None


def _mean(xs) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def frozen_reference(policy: nn.Module) -> nn.Module:
    """A frozen copy of the starting policy for the KL term (only built when β > 0)."""
    ref = copy.deepcopy(policy).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def check_parallel(parallel: str, world_size: int) -> None:
    if world_size > 1 and parallel != "ddp":
        raise UnsupportedError("GRPO rolls out with each rank's full policy: use train.parallel = \"ddp\"")


def run_grpo(model: str, task: Task, cfg: GRPOConfig, train) -> dict[str, Any]:
    """Load `model` (a built-in name, GGUF or HF directory), train it with GRPO under the shared Trainer
    (`train`: a TrainConfig — optimizer, steps, grad_accum, out_dir, checkpoints), and write the result as a
    Hugging Face directory `<out_dir>/final` that `nanoseek eval` / `serve` load."""
    from nanoseek.train.finetune import fit_and_save, load_trainable
    from nanoseek.train.loop import Trainer

    env = D.init_distributed(train.train.device)
    try:
        check_parallel(train.train.parallel, env.world_size)
        loaded = load_trainable(model, env.device)
        policy = loaded.model
        reference = frozen_reference(policy) if cfg.beta > 0 else None
        torch.manual_seed(train.train.seed)
        source = Rollouts(policy, loaded.tokenizer, task, cfg, micro_batches=train.train.grad_accum,
                          rank=env.rank, world_size=env.world_size)
        meta = {"base_model": str(model), "task": task.name, "grpo": vars(cfg)}
        objective = GRPOObjective(cfg, reference)
        return fit_and_save(Trainer(train, policy, objective, source, None, env, meta), loaded, env)
    finally:
        D.shutdown()
