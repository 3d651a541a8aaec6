"""On-policy distillation (DeepSeek-V4): the student samples, the teacher scores the student's own tokens.

Each step: take prompts from a task (or chat jsonl), let the *student* complete them through the shared decode
loop (Engine.generate), and train the student toward the teacher's next-token distribution at every position
of its own completions with the per-token reverse KL

    KL(π_s ‖ π_t) at position t = Σ_v π_s(v | x_<t) · (log π_s(v | x_<t) − log π_t(v | x_<t)),

summed over the student's completion tokens and divided by their number (prompt tokens carry no loss). Reverse
KL is mode-seeking: the student is pushed off what the teacher finds unlikely on the states the student
actually visits, which is what trace distillation (SFT on the teacher's states) never shows it.

The teacher must use the student's tokenizer: it scores the student's token ids. Across vocabularies, the way is
trace distillation (`distill traces`, then `sft`), which only exchanges text. There is no automatic fallback.

Teachers:
- a local model: full logits, the exact loss above (over the tokenizer's ids; padded vocabulary rows dropped).
- a server (`ServerTeacher`: `/v1/completions` with echo + logprobs, the prompt-token log-probs with their
  top-20, `OnPolicyBatch.teacher_ids/teacher_logp`): the
  loss is the exact KL between the two distributions *coarse-grained* onto the teacher's K tokens plus one
  "rest" bucket: Σ_{v∈K} p_s(v)(log p_s(v) − log p_t(v)) + p_s(rest)(log p_s(rest) − log p_t(rest)), with
  p(rest) = 1 − Σ_{v∈K} p(v). It lower-bounds the full-vocabulary KL (merging outcomes never raises a KL),
  equals it when the student and teacher agree on how the rest is shared out, and still penalises student
  mass outside the teacher's top-K. The teacher's rest mass is floored at 1e-6 (rounded top-k logprobs can
  sum to ≥ 1).

Runs on the shared Trainer (train/loop.py), resumable like GRPO: the batch source is GRPO's Rollouts with the
rollout replaced, so the problem stream, sampling seeds and checkpointed position are the same machinery.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.chat import render_prompt
from nanoseek.engine.generate import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.errors import BadInputError
from nanoseek.evaluate import sample_seed
from nanoseek.tasks.base import Problem, Task
from nanoseek.tasks.prompts import Template
from nanoseek.train import distributed as D
from nanoseek.train.distill import ACROSS_VOCABULARIES, load_teacher, post_teacher
from nanoseek.train.grpo import RolloutBatch, Rollouts, Row, _mean
from nanoseek.train.loop import Objective

REST_FLOOR = 1e-6


@dataclass
class OnPolicyConfig:
    prompts_per_step: int = 8        # prompts per step, over all ranks
    samples: int = 1                 # student completions per prompt
    max_new_tokens: int = 128
    temperature: float = 1.0         # the student's sampling; the loss compares the untempered distributions
    top_p: float = 1.0
    template: str = "chat"           # for --task; --data renders its messages with the chat template as they are
    open_think: bool = True
    gen_batch: int = 64
    seed: int = 0
    inner_updates: int = 1           # Rollouts' interface: one optimizer step per rollout (on-policy)

    def validate(self) -> OnPolicyConfig:
        if self.prompts_per_step < 1 or self.samples < 1 or self.max_new_tokens < 1:
            raise BadInputError("prompts_per_step, samples and max_new_tokens must be ≥ 1")
        if self.inner_updates != 1:
            raise BadInputError("on-policy distillation takes one step per rollout (inner_updates = 1)")
        SamplingParams(max_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p).validate()
        return self


def reverse_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """[N, V] student logits, [N, V] teacher log-probs → [N] KL(π_s ‖ π_t), in fp32."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (s.exp() * (s - teacher_logp.float())).sum(-1)


def _log1mexp(x: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """log(1 − e^x) for x ≤ 0, with 1 − e^x floored (a mass that rounding made ≤ 0)."""
    return (-torch.expm1(x)).clamp(min=floor).log() if floor else (-torch.expm1(x)).clamp(min=1e-30).log()


def reverse_kl_topk(student_logits: torch.Tensor, teacher_ids: torch.Tensor,
                    teacher_logp: torch.Tensor) -> torch.Tensor:
    """[N, V] student logits; the teacher's top-K ids and log-probs [N, K] (of its full distribution) → [N]
    KL between the two distributions coarse-grained onto the K tokens plus a "rest" bucket (module doc)."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    s_k = s.gather(-1, teacher_ids)
    t_k = teacher_logp.float()
    s_rest = _log1mexp(torch.logsumexp(s_k, -1).clamp(max=0))
    t_rest = _log1mexp(torch.logsumexp(t_k, -1).clamp(max=0), REST_FLOOR)
    return (s_k.exp() * (s_k - t_k)).sum(-1) + s_rest.exp() * (s_rest - t_rest)


@dataclass
class OnPolicyBatch(RolloutBatch):
    """A rollout micro-batch (ids, completion mask, token_norm); with a top-k teacher, its scores per
    position [b, L-1, K] (zeros off the completion). A local teacher scores in the loss instead."""

    teacher_ids: torch.Tensor | None = None
    teacher_logp: torch.Tensor | None = None


class OnPolicyObjective(Objective):
    """Per-token reverse KL to the teacher on the student's completion tokens (module doc)."""

    name = "onpolicy"
    console_keys = ("kl",)

    def __init__(self, teacher: nn.Module | None, vocab: int):
        self.teacher = teacher.eval() if teacher is not None else None
        self.vocab = vocab   # the tokenizer's ids: padded rows of either model's table are no tokens

    def loss(self, model: nn.Module, batch: OnPolicyBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, _ = model(batch.ids)
        keep = batch.mask.bool()
        s = logits[:, :-1][keep][:, :self.vocab]
        if batch.teacher_ids is not None:
            kl = reverse_kl_topk(s, batch.teacher_ids[keep], batch.teacher_logp[keep])
        else:
            if self.teacher is None:
                raise BadInputError("on-policy distillation needs a teacher: a local model or top-k scores")
            with torch.no_grad():
                t = self.teacher(batch.ids)
                t = t[0] if isinstance(t, tuple) else t
                t_logp = F.log_softmax(t[:, :-1][keep][:, :self.vocab].float(), dim=-1)
            kl = reverse_kl(s, t_logp)
        n = batch.token_norm if batch.token_norm else max(int(keep.sum()), 1)
        loss = kl.sum() / n
        metrics = {k: torch.tensor(v, device=logits.device) for k, v in batch.stats.items()}
        metrics["kl"] = kl.detach().mean() if kl.numel() else torch.zeros((), device=logits.device)
        return loss, metrics

    def tokens(self, batch: OnPolicyBatch) -> int:
        return int(batch.mask.sum())


class ChatTemplate:
    """--data prompts: the record's messages up to its last assistant reply, rendered as they are."""

    stop: tuple[str, ...] = ()

    def render(self, tokenizer, problem: Problem):
        return render_prompt(tokenizer, problem.prompt)


class ChatPrompts(Task):
    """Chat jsonl ({"messages": [...]}) as a prompt source; there is no reward (the teacher is the signal)."""

    name = "chat-data"

    def __init__(self, path: str):
        from pathlib import Path

        from nanoseek.tasks.jsonl import read_jsonl

        self.path = Path(path)
        if not self.path.is_file():
            raise BadInputError(f"{path}: no such file")
        self._problems = []
        for n, rec in read_jsonl(self.path):
            msgs = list(rec.get("messages") or [])
            while msgs and msgs[-1].get("role") == "assistant":
                msgs.pop()
            if not msgs:
                raise BadInputError(f"{path}:{n}: no messages before the reply")
            self._problems.append(Problem(str(rec.get("id", n)), msgs, ""))

    def iter_problems(self, split: str = "train"):
        yield from self._problems

    def check(self, answer, problem) -> bool:
        return False


class OnPolicySource(Rollouts):
    """GRPO's batch source (problem stream, seeds, resume state) with the rollout replaced: the student's
    completions, no rewards; `scorer`, if given, turns (ids, completion start) rows into top-k teacher
    scores (a server teacher)."""

    batch_cls = OnPolicyBatch

    def __init__(self, policy: nn.Module, tokenizer, task: Task, cfg: OnPolicyConfig, *, micro_batches: int,
                 rank: int = 0, world_size: int = 1, scorer=None):
        self._start(policy, tokenizer, task, cfg.validate(), micro_batches, rank, world_size)
        if cfg.prompts_per_step % world_size:
            raise BadInputError(f"prompts_per_step {cfg.prompts_per_step} must divide among {world_size} ranks")
        self.template = ChatTemplate() if isinstance(task, ChatPrompts) else Template(cfg.template, cfg.open_think)
        self.engine = Engine(policy, tokenizer, max_batch=cfg.gen_batch)
        self.scorer = scorer

    @torch.no_grad()
    def _collect(self) -> list[RolloutBatch]:
        cfg, t0 = self.cfg, time.perf_counter()
        want = cfg.prompts_per_step // self.world
        problems = [next(self._stream) for _ in range(want)]
        self.consumed += want
        prompts = [self.template.render(self.tokenizer, p) for p in problems]
        params = [SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                 stop=list(self.template.stop),
                                 seed=sample_seed(cfg.seed, f"{self.rollouts}/{p.id}", j))
                  for p in problems for j in range(cfg.samples)]
        was_training = self.policy.training
        self.policy.eval()
        outs = self.engine.generate([pr.ids for pr in prompts for _ in range(cfg.samples)], params)
        if was_training:
            self.policy.train()
        self.rollouts += 1
        rows = []
        for k, out in enumerate(outs):
            completion = out.sampled_ids
            rows.append(Row(prompts[k // cfg.samples].ids, completion, 0.0))
        stats = {"completion_len": _mean([len(o.token_ids) for o in outs]), "rollout_s": time.perf_counter() - t0}
        tokens = D.all_reduce_sum(torch.tensor([float(sum(len(r.completion) for r in rows))]))
        batches = self._micro_batches(rows, torch.zeros(len(rows)), stats, float(tokens) / (self.micro_batches * self.world))
        # The student's training forward, padding included: what "the same student compute" is measured in.
        stats["batch_tokens"] = float(sum(b.ids.numel() for b in batches))
        out = []
        for b in batches:
            ob = OnPolicyBatch(**vars(b))
            if self.scorer is not None:
                ob.teacher_ids, ob.teacher_logp = self.scorer(ob.ids, ob.mask)
            out.append(ob)
        return out


class ServerTeacher:
    """A nanoseek server (or any server with the same contract) as the teacher: `/v1/completions` with the
    student's token ids as the prompt, `echo`, `logprobs: K` and `return_tokens_as_token_ids` returns each
    prompt token's log-prob with the K most likely tokens (the loss on that truncated distribution: module
    doc). Chat APIs' top_logprobs describe the API's own samples and cannot score given tokens."""

    def __init__(self, url: str, key: str | None = None, model: str | None = None, top_k: int = 20,
                 timeout_s: float = 300.0):
        # Both /tokenize and /v1/completions are asked for: take the server's root whether or not URL ends in /v1.
        self.url = url.rstrip("/").removesuffix("/v1")
        self.key, self.model, self.k, self.timeout_s = key, model, top_k, timeout_s

    def _post(self, path: str, body: dict) -> dict:
        return post_teacher(self.url + path, body, self.key, self.model, self.timeout_s)

    def check_tokenizer(self, tokenizer, student: str) -> None:
        """The same ids for a probe text, or the one-line error (the server's vocabulary is not visible)."""
        probe = "Teacher and student: 12 + 34 = 46, naïve café — 東京 <think> </answer>\n"
        got = self._post("/tokenize", {"prompt": probe, "add_special_tokens": False}).get("tokens")
        if got != list(tokenizer.encode(probe, add_special_tokens=False)):
            raise BadInputError(f"teacher {self.url} and student {student} do not tokenize alike: on-policy "
                                f"distillation needs one tokenizer; {ACROSS_VOCABULARIES}")

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [b, L] (right-padded) → the teacher's top-K ids and log-probs [b, L-1, K] (zeros off `mask`)."""
        b, length = ids.shape
        t_ids = torch.zeros(b, length - 1, self.k, dtype=torch.long)
        t_logp = torch.zeros(b, length - 1, self.k)
        for r in range(b):
            used = mask[r].nonzero()
            if not len(used):
                continue
            end = int(used[-1]) + 2            # tokens up to the last scored one
            seq = ids[r, :end].tolist()
            reply = self._post("/v1/completions", {"prompt": seq, "echo": True, "logprobs": self.k, "max_tokens": 1,
                                                   "temperature": 0, "return_tokens_as_token_ids": True})
            tops = reply["choices"][0]["logprobs"]["top_logprobs"]
            for j in range(1, end):           # token j's row: the distribution at position j - 1
                row = tops[j] or {}
                if mask[r, j - 1] and len(row) < self.k:
                    raise BadInputError(f"teacher {self.url} returned {len(row)} of {self.k} top log-probs")
                for c, (name, v) in enumerate(list(row.items())[:self.k]):
                    t_ids[r, j - 1, c] = int(name.split(":", 1)[1])
                    t_logp[r, j - 1, c] = v
        return t_ids.to(ids.device), t_logp.to(ids.device)


def run_onpolicy(teacher: str | None, student: str, task: Task, cfg: OnPolicyConfig, train, *,
                 teacher_url: str | None = None, teacher_key: str | None = None,
                 teacher_model: str | None = None) -> dict[str, Any]:
    """On-policy distil `teacher` (a local model) or the server at `teacher_url` into `student` on `task`'s
    prompts; writes `<out_dir>/final`."""
    from nanoseek.train.finetune import fit_and_save, load_trainable
    from nanoseek.train.loop import Trainer

    cfg.validate()
    env = D.init_distributed(train.train.device)
    try:
        if (teacher is None) == (teacher_url is None):
            raise BadInputError("give the teacher as --teacher MODEL or --teacher-url URL (one of them)")
        loaded = load_trainable(student, env.device)
        tmodel, scorer = None, None
        if teacher_url is not None:
            scorer = ServerTeacher(teacher_url, teacher_key, teacher_model)
            scorer.check_tokenizer(loaded.tokenizer, student)
        else:
            tmodel = load_teacher(teacher, loaded, student, "on-policy distillation", env.device)
        torch.manual_seed(train.train.seed)
        source = OnPolicySource(loaded.model, loaded.tokenizer, task, cfg, micro_batches=train.train.grad_accum,
                                rank=env.rank, world_size=env.world_size, scorer=scorer)
        meta = {"teacher": str(teacher or teacher_url), "base_model": str(student), "task": task.name,
                "onpolicy": vars(cfg)}
        objective = OnPolicyObjective(tmodel, len(loaded.tokenizer))
        return fit_and_save(Trainer(train, loaded.model, objective, source, None, env, meta), loaded, env)
    finally:
        D.shutdown()
