"""Pretraining: next-token prediction on packed token shards, plus DeepSeek-V3's multi-token prediction.

Only what is particular to pretraining lives here — the objective, weight initialization and the wiring
from a TrainConfig to the shared `Trainer` (loop.py).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanoseek.errors import BadInputError
from nanoseek.models import build_model
from nanoseek.models.config import DeepseekConfig
from nanoseek.train import distributed as D
from nanoseek.train.config import TrainConfig
from nanoseek.train.loop import Objective, Trainer, cross_entropy


class LanguageModeling(Objective):
    """CE of the next token, plus λ/D·Σ_k CE of token t+k+1 from MTP depth k (V3 §2.2, eq. 24–25).

    Batches are (x, y) with y[:, t] = x[:, t+1] (the packed loader's windows). MTP depth k's row t predicts
    x[t+k+1] = y[t+k], so its targets are y[:, k:] — every row has one, the last from the window's extra token.
    """

    name = "pretrain"
    console_keys = ("ce", "mtp", "balance")   # CE alone compares with the held-out CE; the loss adds λ·MTP

    def __init__(self, mtp_weight: float = 0.0):
        self.mtp_weight = mtp_weight

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        logits, depths = model(x, mtp=True)
        ce = cross_entropy(logits, y)
        metrics = {"ce": ce.detach()}
        if not depths:
            return ce, metrics
        mtp = sum(cross_entropy(lg, y[:, k:]) for k, lg in enumerate(depths, start=1)) / len(depths)
        metrics["mtp"] = mtp.detach()
        return ce + self.mtp_weight * mtp, metrics


@torch.no_grad()
def init_weights(model: nn.Module, std: float) -> None:
    """Every matrix (linear, embedding, router, packed experts) ~ N(0, std) as in V3 §4.2 (std 0.006 there);
    norm scales 1, biases and router selection biases 0 (V4's mHC `base` biases and attention sinks too)."""
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, std)
        elif name.endswith(("bias", "base", "sinks")):
            p.zero_()
        else:
            p.fill_(1.0)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()


def _tokenizer_dir(cfg: TrainConfig, meta: dict[str, Any]) -> str | None:
    tok = cfg.data.tokenizer or meta.get("tokenizer")
    if isinstance(tok, dict):
        tok = tok.get("path") or tok.get("name")
    if tok and Path(tok).exists():
        tok = str(Path(tok).resolve())
    return tok


def pretrain(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a pretraining run; returns the last train and eval records."""
    from nanoseek.train.data import PackedLoader, TokenShards, iter_eval_batches

    if not cfg.data.path:
        raise BadInputError("[data] path is not set: a directory made by `nanoseek data prepare` "
                            "(or --set data.path=DIR)")
    env = D.init_distributed(cfg.train.device)
    try:
        train = TokenShards(cfg.data.path, "train")
        val = TokenShards(cfg.data.path, cfg.data.eval_split) if cfg.data.eval_split in train.meta["splits"] else None
        mcfg = cfg.model_config(train.vocab_size, train.bos_id, train.eos_id)
        if mcfg.vocab_size < train.vocab_size:
            raise BadInputError(f"[model] vocab_size {mcfg.vocab_size} is smaller than the data's "
                                f"{train.vocab_size} ({cfg.data.path})")
        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
        model = build_model(mcfg)
        init_weights(model, cfg.train.init_std)
        seq, bs = cfg.data.seq_len, cfg.data.batch_size
        loader = PackedLoader(train, seq, bs, rank=env.rank, world_size=env.world_size, seed=cfg.train.seed,
                              device=env.device)
        evals = None
        if val is not None and val.num_tokens > seq:
            evals = functools.partial(iter_eval_batches, val, seq, bs, cfg.train.eval_batches, env.rank,
                                      env.world_size, device=env.device)
        mtp_weight = mcfg.mtp_loss_weight if isinstance(mcfg, DeepseekConfig) else 0.0
        meta = {"tokenizer": _tokenizer_dir(cfg, train.meta), "data": str(Path(cfg.data.path).resolve())}
        trainer = Trainer(cfg, model, LanguageModeling(mtp_weight), loader, evals, env, meta)
        return trainer.fit()
    finally:
        D.shutdown()
