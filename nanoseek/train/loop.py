"""THE training loop. Pretraining, SFT, GRPO and distillation all run through `Trainer`; each brings only an
`Objective` (the loss of one micro-batch) and a batch source (`next_batch`, `state_dict`, `load_state_dict`).

The Trainer owns everything else: device and torchrun process group, DDP / FSDP2 wrapping, optional
torch.compile of the blocks, AdamW or Muon, the lr schedule, gradient accumulation, clipping, bf16 autocast on
GPU (fp32 on CPU), and for DeepSeekMoE models:
  - the sequence-wise balance loss α·Σ_layers L_bal (V3 §2.1.2, eq. 17–20) added to the objective's loss;
  - the aux-loss-free bias update b_i += γ·sign(mean(c) − c_i) after every optimizer step, with the expert
    loads c summed over all micro-batches and all ranks (the global batch, as V3 specifies);
  - per-layer load imbalance (max/mean tokens per expert) in the logs;
and for DeepSeek-V3.2 (DSA, models/dsa.py) the lightning indexer's KL loss: during the first
`train.indexer_warmup_steps` steps attention stays dense and only that loss is optimised (so only the indexer
learns, and the router biases hold still); after them attention is top-k sparse and the loss is added to the
objective's (the indexer's input is detached, so each part learns only from its own loss).
Plus periodic held-out eval, JSONL metrics with a rich progress line, atomic checkpoints with exact resume
(checkpoint.py), and PNG plots at the end (plots.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.errors import BadInputError
from nanoseek.files import write_text_atomic
from nanoseek.models.config import DeepseekConfig, DeepseekV4Config
from nanoseek.models.dsa import dsa_modules
from nanoseek.models.moe import sequence_balance_loss, update_router_bias
from nanoseek.train import checkpoint as ckpt
from nanoseek.train import distributed as D
from nanoseek.train.config import TrainConfig
from nanoseek.train.optim import build_optimizers, lr_factor, set_lr


class BatchSource(Protocol):
    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Objective:
    """What a training method adds: the loss of one micro-batch. `model` is the wrapped training root; call
    it as `model(ids, mtp=...)` → (logits [B, T, V], [MTP logits per depth]). Metrics are detached scalars,
    averaged over micro-batches and ranks for the logs; a metric named `ce` is the held-out figure."""

    name = "objective"
    # The metrics the progress line shows, in order (those a record has): what the objective optimises
    # first, so the console and the plots (plots.py) carry the same keys.
    console_keys: tuple[str, ...] = ("loss",)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def tokens(self, batch: Any) -> int:
        """Tokens this micro-batch processes (for tokens/s)."""
        return int(batch[0].numel())


class LMForward(nn.Module):
    """The module that DDP / FSDP wrap. Its forward returns everything objectives use, so the wrapper's
    hooks (gradient sync, parameter gathering) see every parameter that takes part."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor, mtp: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.lm.hidden(ids)
        logits = self.lm.lm_head(h)
        depths = self.lm.mtp_logits(ids, h) if mtp and len(getattr(self.lm, "mtp", ())) else []
        return logits, depths


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy, computed in fp32 (bf16 log-softmax over a large vocabulary loses digits)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index)


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written (rank 0 only)."""

    def __init__(self, path: Path, keep_until: int | None = None, tracker=None):
        self.path, self.tracker = path, tracker
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until is not None and path.exists():
            # Resuming: drop what the interrupted run logged past its last checkpoint (and any torn line),
            # so the file reads as one run.
            kept = [line for line in read_jsonl(path) if line.get("step", 0) <= keep_until]
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        elif keep_until is None:
            path.write_text("")
        self._f = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self.tracker is not None:
            self.tracker.log(record)

    def close(self) -> None:
        self._f.close()
        if self.tracker is not None:
            self.tracker.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill
    return out


class Trainer:
    """Trains `model` (an unwrapped nanoseek CausalLM) on `objective` over batches from `source`.

    Construction joins the torchrun group (unless `env` is given), wraps the model, builds the optimizers and
    resumes from the newest checkpoint in `cfg.train.out_dir` when there is one. `fit()` runs to
    `cfg.train.steps`; `train_step()` and `evaluate()` are public for methods that interleave their own work
    (GRPO's rollouts between steps). `self.lm` is the unwrapped model (generation, export)."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, objective: Objective, source: BatchSource,
                 eval_batches: Callable[[], Iterable[Any]] | None = None, env: D.DistEnv | None = None,
                 meta: dict[str, Any] | None = None):
        self.cfg, self.objective, self.source, self.eval_batches = cfg, objective, source, eval_batches
        self.env = env or D.init_distributed(cfg.train.device)
        self.meta = dict(meta or {})
        run = cfg.train
        if run.precision not in ("auto", "fp32", "bf16"):
            raise BadInputError(f"[train] precision {run.precision!r}: expected auto, fp32 or bf16")
        if run.grad_accum < 1 or run.steps < 0:
            raise BadInputError("[train] grad_accum must be ≥ 1 and steps ≥ 0")
        from nanoseek.train.tracking import check_kind

        check_kind(run.log)   # before any work: a typo should not surface after the model loads
        dev = self.env.device
        self.bf16 = run.precision == "bf16" or (run.precision == "auto" and dev.type == "cuda")
        self.lm = model.to(dev).train()
        mcfg = model.config
        self.moe = model.moe_layers() if isinstance(mcfg, (DeepseekConfig, DeepseekV4Config)) else []
        # The plots name each MoE by its model layer (layer 0 is often dense, so the first MoE is layer 1+).
        self.moe_labels = moe_labels(model, self.moe)
        self.gamma = mcfg.bias_update_speed if self.moe else 0.0
        self.alpha = mcfg.seq_aux_alpha if self.moe else 0.0
        self.dsa = dsa_modules(model)
        blocks = list(model.model.layers) + list(getattr(model, "mtp", []))
        if run.compile:
            # The main stack's blocks only: an MTP module computes its rotary positions itself (a host sync,
            # so a graph break), and it is one block of many.
            for b in model.model.layers:
                b.compile()
        self.root = LMForward(model)
        self.model = D.wrap(self.root, blocks, run.parallel, self.env)
        self.optimizers = build_optimizers(self.model, cfg.optim, dev)
        self.step, self.tokens_seen = 0, 0
        self.run_dir = Path(run.out_dir)
        self.log: MetricsLog | None = None
        self._resume()

    # --------------------------------------------------------------------------------------- setup

    def _resume(self) -> None:
        resumed = None
        if self.env.is_main:
            ckpt.clear_stale(self.run_dir)
        D.barrier()
        path = ckpt.latest(self.run_dir)
        if path is not None and not self.cfg.train.resume:
            # A fresh run in a directory of old checkpoints would interleave with them (keep-last-N could delete
            # its own and a later resume would pick up the old run's): refuse rather than mix two runs.
            raise BadInputError(f"{self.run_dir} holds checkpoints of an earlier run ({path.name}) and "
                                "train.resume is off: use another out_dir or remove them")
        if path is not None:
            meta = ckpt.read_meta(path)
            self._check_same_model(meta)
            self._warn_schedule(meta, path.name)
            # The saved param groups carry the old run's hyperparameters; this run's config wins (a resumed run
            # may lower the lr on purpose), only the moments and step counts come from the checkpoint.
            keep = ("peak_lr", "weight_decay", "betas", "eps", "momentum")
            hyper = [[{k: g[k] for k in keep if k in g} for g in o.param_groups] for o in self.optimizers]
            state = ckpt.restore(path, self.model, self.optimizers, self.lm.config.tie_word_embeddings, self.env)
            for opt, groups in zip(self.optimizers, hyper):
                for g, h in zip(opt.param_groups, groups):
                    g.update(h)
            self.step, self.tokens_seen = state["step"], state["tokens"]
            self.source.load_state_dict(state["source"])
            ckpt.set_rng_state(state["rng"])
            resumed = self.step
        if self.env.is_main:
            tracker = None
            if self.cfg.train.log != "jsonl":
                from nanoseek.train.tracking import Tracker

                tracker = Tracker(self.cfg.train.log, self.run_dir, self.cfg.to_dict(), self.moe_labels)
            self.log = MetricsLog(self.run_dir / "metrics.jsonl", keep_until=resumed, tracker=tracker)
            write_text_atomic(self.run_dir / "config.json", json.dumps(self.cfg.to_dict(), indent=1) + "\n")
            if resumed is not None:
                print(f"nanoseek: resumed from {path} (step {resumed})", file=sys.stderr)

    def _check_same_model(self, meta: dict[str, Any]) -> None:
        """Resuming a run with another model would fail deep inside the state-dict loader (90 lines of size
        mismatches): compare the checkpoint's recorded model with this one first and say what changed."""
        saved = meta.get("model")
        now = json.loads(json.dumps(ckpt.model_spec(self.lm.config)))  # tuples → lists, as meta.json holds them
        if saved is None or saved == now:
            return
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        shown = ", ".join(f"{k} {saved.get(k)!r} → {now.get(k)!r}" for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise BadInputError(f"{self.run_dir} holds a run of another model ({shown}{more}): choose a new --out "
                            "(train.out_dir) for the changed model, or undo the change to resume")

    def _warn_schedule(self, meta: dict[str, Any], name: str) -> None:
        """The lr schedule is a function of (step, train.steps): resuming with another train.steps re-shapes it
        (a cosine decay stretches from the current step on; wsd's decay moves). Allowed, but said at start."""
        before = meta.get("train_config", {}).get("train", {}).get("steps")
        if self.env.is_main and before is not None and before != self.cfg.train.steps:
            print(f"nanoseek: warning: train.steps changed from {before} to {self.cfg.train.steps} since "
                  f"{name}: the {self.cfg.optim.schedule} lr schedule is re-shaped over the new length",
                  file=sys.stderr)

    def _autocast(self):
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _grad_sync(self, sync: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if hasattr(self.model, "no_sync"):  # DDP
            return contextlib.nullcontext() if sync else self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    # --------------------------------------------------------------------------------------- one step

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns the logged record."""
        run = self.cfg.train
        t0 = time.perf_counter()
        lr = set_lr(self.optimizers, lr_factor(self.step, run.steps, self.cfg.optim))
        sums: dict[str, torch.Tensor] = {}
        n_exp = self.moe[0].gate.n_experts if self.moe else 0
        loads = torch.zeros(len(self.moe), n_exp, device=self.env.device)
        tokens = 0
        warmup = bool(self.dsa) and self.step < run.indexer_warmup_steps
        for m in self.dsa:
            m.stage = "warmup" if warmup else "sparse"
        for micro in range(run.grad_accum):
            batch = self.source.next_batch()
            tokens += self.objective.tokens(batch)
            with self._grad_sync(micro == run.grad_accum - 1):
                with self._autocast():
                    loss, metrics = self.objective.loss(self.model, batch)
                    if self.moe and self.alpha > 0 and not warmup:
                        # Only layers this forward ran: an objective may skip the MTP modules (and their MoEs).
                        bal = sum(sequence_balance_loss(m.last_scores, m.last_idx, m.gate.top_k)
                                  for m in self.moe if m.last_scores is not None)
                        loss = loss + self.alpha * bal
                        metrics["balance"] = bal.detach()
                    kls = [m.last_index_loss for m in self.dsa if m.last_index_loss is not None]
                    if kls:  # mean over the DSA layers this forward ran
                        kl = torch.stack(kls).mean()
                        metrics["indexer_kl"] = kl.detach()
                        if warmup:  # the objective's loss is logged, not optimised. Its 0· keeps every
                            # parameter in the backward, as DDP expects; their zero gradients are dropped below.
                            metrics["lm_loss"], loss = loss.detach(), kl + 0.0 * loss
                        else:
                            loss = loss + kl
                (loss / run.grad_accum).backward()
            for m in self.dsa:
                m.last_index_loss = None  # it holds the graph; free it now
            for i, m in enumerate(self.moe):
                if m.last_load is not None:
                    loads[i] += m.last_load
                m.last_scores = m.last_idx = None  # they hold the graph; free them now
            metrics = {"loss": loss.detach(), **metrics}
            for k, v in metrics.items():
                sums[k] = sums[k] + v.detach().float() if k in sums else v.detach().float()
        if warmup:  # only the indexer learns: no optimizer may touch the rest (weight decay included)
            keep = {id(p) for m in self.dsa for p in m.indexer.parameters()}
            for p in self.model.parameters():
                if id(p) not in keep:
                    p.grad = None
        clip = self.cfg.optim.grad_clip
        # max_norm=inf still returns the norm for the logs and leaves gradients bitwise unchanged.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if self.moe:
            D.all_reduce_sum(loads)
            if self.gamma > 0 and not warmup:
                for m, load in zip(self.moe, loads):
                    update_router_bias(m.gate.e_score_correction_bias, load, self.gamma)
        keys = sorted(sums)
        dev = self.env.device
        # One all-reduce (and one host sync) for every logged figure: metrics are averaged over ranks, tokens
        # summed (ranks may differ, e.g. SFT batches of uneven length).
        local = torch.stack([sums[k] for k in keys]
                            + [grad_norm.float().to(dev), torch.tensor(float(tokens), device=dev)])
        total = D.all_reduce_sum(local).tolist()
        values, tokens = [v / self.env.world_size for v in total[:-1]], round(total[-1])
        self.step += 1
        self.tokens_seen += tokens
        dt = time.perf_counter() - t0
        rec: dict[str, Any] = {"kind": "train", "step": self.step}
        rec.update({k: v / run.grad_accum for k, v in zip(keys, values[:-1])})
        rec.update(grad_norm=values[-1], lr=lr, tokens=self.tokens_seen, tokens_per_s=tokens / dt, step_s=dt)
        if self.moe:  # max/mean tokens per expert (moe.load_imbalance), all layers in one host transfer
            ratio = loads.max(1).values / loads.mean(1).clamp(min=1e-9)
            rec["load_max_mean"] = [round(r, 4) for r in ratio.tolist()]
        return rec

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any] | None:
        if self.eval_batches is None:
            return None
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        n = 0
        for batch in self.eval_batches():
            with self._autocast():
                loss, metrics = self.objective.loss(self.model, batch)
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums[k] + v.float() if k in sums else v.float()
            n += 1
        self.model.train()
        if not n:
            return None
        keys = sorted(sums)
        stacked = D.all_reduce_sum(torch.stack([sums[k] for k in keys]))
        values = (stacked / (n * self.env.world_size)).tolist()
        rec = {"kind": "eval", "step": self.step, **{f"eval_{k}": v for k, v in zip(keys, values)}}
        return rec

    def save(self) -> Path | None:
        state = {"rng": ckpt.rng_state(), "source": self.source.state_dict(), "tokens": self.tokens_seen}
        meta = {"model": ckpt.model_spec(self.lm.config), "objective": self.objective.name,
                "train_config": self.cfg.to_dict(), **self.meta}
        return ckpt.save(self.run_dir, self.step, self.model, self.optimizers, state, meta,
                         self.lm.config.tie_word_embeddings, self.cfg.train.keep_last, self.env)

    # --------------------------------------------------------------------------------------- the run

    def fit(self) -> dict[str, Any]:
        """Train to `steps`, evaluating, logging and checkpointing on the way; returns the last records."""
        run = self.cfg.train
        last: dict[str, Any] = {}
        if self.step >= run.steps and ckpt.latest(self.run_dir):  # resumed a finished run: nothing to do
            if self.log:
                self.log.close()
            return last
        with _Progress(self.env.is_main, run.steps, self.step, self.objective.console_keys) as progress:
            while self.step < run.steps:
                rec = self.train_step()
                last["train"] = rec
                if self.log:
                    self.log.write(rec)
                if run.eval_every and self.step % run.eval_every == 0 and self.step < run.steps:
                    ev = self.evaluate()
                    if ev:
                        last["eval"] = ev
                        if self.log:
                            self.log.write(ev)
                progress.update(self.step, rec, last.get("eval"), force=self.step % max(run.log_every, 1) == 0)
                if run.ckpt_every and self.step % run.ckpt_every == 0 and self.step < run.steps:
                    self.save()
            ev = self.evaluate()
            if ev:
                last["eval"] = ev
                if self.log:
                    self.log.write(ev)
                progress.update(self.step, last.get("train", {}), ev, force=True)
        self.save()
        if self.log:
            self.log.close()
            if run.plots:
                from nanoseek.train.plots import plot_run

                plot_run(self.run_dir, self.objective.name, self.moe_labels)
        return last


def moe_labels(model: nn.Module, moes: list[nn.Module]) -> list[str]:
    """A name per MoE of `moes` (moe_layers() order), by model layer index: ['layer 1', 'layer 2', 'MTP depth 1']."""
    names = {id(m): n for n, m in model.named_modules()}
    return [_layer_label(names[id(m)]) for m in moes]


def _layer_label(module_name: str) -> str:
    """'model.layers.3.mlp' → 'layer 3'; 'mtp.0.mlp' → 'MTP depth 1'."""
    parts = module_name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return f"layer {parts[i + 1]}"
        if p == "mtp" and parts[i + 1].isdigit():
            return f"MTP depth {int(parts[i + 1]) + 1}"
    return module_name


def format_metrics(rec: dict[str, Any], keys: Iterable[str]) -> str:
    """The figures of a record the console shows: the objective's keys, then lr, throughput and MoE load."""
    parts = [f"{k} {rec[k]:.4f}" for k in keys if isinstance(rec.get(k), (int, float))]
    if "lr" in rec:
        parts.append(f"lr {rec['lr']:.2e}")
    if "tokens_per_s" in rec:
        parts.append(f"{rec['tokens_per_s']:,.0f} tok/s")
    if "load_max_mean" in rec:
        parts.append(f"load max/mean {max(rec['load_max_mean']):.2f}")
    return "  ".join(parts)


class _Progress:
    """A rich progress bar with the latest figures on a terminal; otherwise a plain line every log_every
    steps, and at least every PLAIN_EVERY_S seconds (a log file or CI shows progress even for short runs)."""

    PLAIN_EVERY_S = 10.0

    def __init__(self, enabled: bool, total: int, start: int, keys: Iterable[str] = ("loss",)):
        self.enabled, self.total, self.start, self.keys = enabled, total, start, tuple(keys)
        self.tty = sys.stderr.isatty()
        self._prog = None
        self._last = time.monotonic()

    def __enter__(self):
        if self.enabled and self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._prog = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                  TextColumn("{task.fields[info]}"), console=Console(stderr=True))
            self._prog.__enter__()
            self._task = self._prog.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def update(self, step: int, rec: dict[str, Any], ev: dict[str, Any] | None, force: bool) -> None:
        if not self.enabled:
            return
        info = format_metrics(rec, self.keys)
        if ev and "eval_ce" in ev:
            info += f"  held-out ce {ev['eval_ce']:.4f}"
        if self._prog is not None:
            self._prog.update(self._task, completed=step, info=info)
        elif force or step == self.total or time.monotonic() - self._last >= self.PLAIN_EVERY_S:
            self._last = time.monotonic()
            print(f"step {step}/{self.total}  {info}", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._prog is not None:
            self._prog.__exit__(*exc)
        return False
