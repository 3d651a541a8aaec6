"""Optimizers and learning-rate schedules for the training loop.

- AdamW (β = (0.9, 0.95), weight decay 0.1 on matrices only: V3 §4.2), fused on CUDA.
- Muon (torch.optim.Muon: momentum orthogonalized by Newton–Schulz) for the 2-D weight matrices inside the
  blocks; AdamW keeps what Muon is not meant for — embeddings, the output head, norms, the router, and the
  packed [E, out, in] expert tensors (torch's Muon takes 2-D parameters only).
- Schedules are a multiplier on each group's peak lr: linear warmup, then cosine to a floor, WSD
  (warmup-stable-decay: flat, then a linear decay over the last `decay_frac` of steps), or constant.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nanoseek.errors import BadInputError, UnsupportedError
from nanoseek.train.config import OptimConfig


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier on the peak lr for optimizer step `step` (0-based) of `total`."""
    if cfg.schedule not in ("constant", "cosine", "wsd"):  # checked first, so a typo fails at step 0
        raise BadInputError(f"[optim] schedule {cfg.schedule!r}: expected cosine, wsd or constant")
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(total - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay = max(int(round(total * cfg.decay_frac)), 1)
        start = total - decay
        if step < start:
            return 1.0
        return 1.0 - (1 - floor) * min((step - start + 1) / decay, 1.0)
    raise BadInputError(f"[optim] schedule {cfg.schedule!r}: expected cosine, wsd or constant")


def _is_muon_matrix(name: str, p: nn.Parameter) -> bool:
    # Embedding rows and the head's output rows are per-token vectors, not a linear map between hidden
    # spaces: Muon's orthogonalization is meant for the latter (Jordan et al. 2024).
    if p.ndim != 2 or "embed_tokens" in name or "lm_head" in name:
        return False
    return not name.endswith("gate.weight")  # the router stays on AdamW: its scores feed a top-k


def build_optimizers(model: nn.Module, cfg: OptimConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """One AdamW, plus a Muon in front of it when cfg.name == "muon". Every param group records its peak
    lr as `peak_lr`; the loop multiplies it by `lr_factor` each step."""
    if cfg.name not in ("adamw", "muon"):
        raise BadInputError(f"[optim] name {cfg.name!r}: expected adamw or muon")
    if cfg.fused not in ("auto", "on", "off"):
        raise BadInputError(f"[optim] fused {cfg.fused!r}: expected auto, on or off")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [p for n, p in named if cfg.name == "muon" and _is_muon_matrix(n, p)]
    in_muon = {id(p) for p in muon}
    decay = [p for n, p in named if id(p) not in in_muon and p.ndim >= 2]
    no_decay = [p for n, p in named if id(p) not in in_muon and p.ndim < 2]
    fused = cfg.fused == "on" or (cfg.fused == "auto" and device.type == "cuda")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    opts: list[torch.optim.Optimizer] = []
    if muon:
        if any(type(p).__name__ == "DTensor" for p in muon):
            raise UnsupportedError("Muon with FSDP-sharded parameters: use parallel = \"ddp\" or name = \"adamw\"")
        # match_rms_adamw scales each update to AdamW's RMS (Moonlight, Liu et al. 2025 §2.2), so AdamW's lr
        # and weight decay carry over unchanged.
        lr = cfg.muon_lr if cfg.muon_lr is not None else cfg.lr
        opts.append(torch.optim.Muon(muon, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                                     adjust_lr_fn="match_rms_adamw"))
    opts.append(torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  fused=fused or None))
    for opt in opts:
        for g in opt.param_groups:
            g["peak_lr"] = g["lr"]
    return opts


def set_lr(opts: list[torch.optim.Optimizer], factor: float) -> float:
    """Apply the schedule; returns the AdamW lr (what the logs call `lr`)."""
    for opt in opts:
        for g in opt.param_groups:
            g["lr"] = g["peak_lr"] * factor
    return opts[-1].param_groups[0]["lr"]
