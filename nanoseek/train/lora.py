"""LoRA (Hu et al. 2021): fine-tune a frozen model through low-rank updates of its linear layers.

`apply_lora` swaps chosen `nn.Linear`s for `LoRALinear`s, y = W·x + b + (α/r)·B·A·dropout(x), with A (r × in)
Kaiming-uniform and B (out × r) zero, so the wrapped model starts out computing exactly what the original did
(§4.1); every other parameter is frozen, so the optimizer holds only A and B. `merge_lora` folds (α/r)·B·A into
W and puts the plain `nn.Linear`s back: what gets saved is an ordinary model under its original parameter
names, which transformers and `nanoseek serve` load with no adapter code (§4.1: no inference latency).

Targets are matched by a linear's attribute name (`q_proj` matches every layer's attention query). MoE routed
experts are packed 3-D parameters, not linears, so they stay frozen; the shared experts are linears and can be
targeted. A head tied to the input embedding cannot be a target: its weight is the embedding's too.

While wrapped, checkpoints hold the base weights under `<name>.base.weight` beside `<name>.lora_A.weight` /
`<name>.lora_B.weight`; resuming re-applies LoRA to the base model first, then loads them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nanoseek.errors import BadInputError

# Attention and MLP projections of the dense (Llama/Qwen2) family, and of MLA's full-rank query, its output and
# the shared/dense SwiGLUs of DeepSeek models. MLA's low-rank projections (q_a_proj, q_b_proj,
# kv_a_proj_with_mqa, kv_b_proj) are opt-in through `targets`.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    r: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] | None = None  # None: DEFAULT_TARGETS, those the model has
    dropout: float = 0.0
    seed: int = 0  # initialization of A (the same on every rank)

    def validate(self) -> LoRAConfig:
        if self.r < 1:
            raise BadInputError(f"LoRA rank r must be >= 1, got {self.r}")
        if not self.alpha > 0:
            raise BadInputError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise BadInputError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.targets is not None and not self.targets:
            raise BadInputError("LoRA targets: empty list (name at least one linear, e.g. q_proj,v_proj)")
        return self


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable rank-r update scaled by α/r (§4.1: the scale keeps the update's
    size roughly independent of r, so the lr need not be retuned when r changes)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device="cpu", dtype=w.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device="cpu", dtype=w.dtype)
        # A: nn.Linear's own Kaiming-uniform init, drawn from `generator` so every rank starts alike; B = 0 so
        # B·A = 0 and training starts from the base model exactly.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(w.device)
        self.lora_B.to(w.device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W + (α/r)·B·A, for code that reads a projection's weight instead of calling it
        (MLA's absorbed decode folds kv_b_proj.weight into the query and output)."""
        return self.base.weight + self.scale * (self.lora_B.weight @ self.lora_A.weight).to(self.base.weight.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(self.dropout(x)))

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base linear with the update folded into its weight (computed in fp32, stored in the weight's
        dtype). A new tensor, not an in-place add: the old one may be memory-mapped from the loaded file or
        held elsewhere (a frozen reference copy)."""
        w = self.base.weight
        delta = self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        self.base.weight = nn.Parameter((w.float() + delta).to(w.dtype), requires_grad=w.requires_grad)
        return self.base

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    # Every path, duplicates included: a linear shared by two parents is wrapped once and set under both.
    return [(n, m) for n, m in model.named_modules(remove_duplicate=False) if type(m) is nn.Linear]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 32.0, targets: Sequence[str] | None = None,
               dropout: float = 0.0, seed: int = 0) -> list[str]:
    """Wrap every `nn.Linear` whose attribute name is in `targets` in a LoRALinear and freeze every other
    parameter; returns the wrapped modules' names. `targets=None` means DEFAULT_TARGETS, taking those the
    model has; targets given explicitly must each name a linear of the model."""
    cfg = LoRAConfig(r, alpha, tuple(targets) if targets is not None else None, dropout, seed).validate()
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise BadInputError("the model already has LoRA adapters (merge_lora first)")
    linears = _linears(model)
    present = sorted({n.rpartition(".")[2] for n, _ in linears})
    wanted = cfg.targets or DEFAULT_TARGETS
    chosen = [(n, m) for n, m in linears if n.rpartition(".")[2] in wanted]
    missing = [t for t in wanted if t not in present]
    if not chosen or (cfg.targets is not None and missing):
        raise BadInputError(f"LoRA targets {', '.join(missing or wanted)}: no such linear layer in the model "
                            f"(its linear layers: {', '.join(present)})")
    # A weight that is also another module's parameter (a head tied to the embedding) cannot take a private
    # update: merging it would change the embedding too.
    paths: dict[int, set[str]] = {}
    for n, m in linears:
        paths.setdefault(id(m), set()).add(n)
    owners: dict[int, set[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), set()).add(n.rpartition(".")[0])
    for n, m in chosen:
        if owners[id(m.weight)] - paths[id(m)]:
            raise BadInputError(f"LoRA target {n}: its weight is shared with "
                                f"{', '.join(sorted(owners[id(m.weight)] - paths[id(m)]))} (tied embeddings); "
                                "leave it out of the targets")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    done: dict[int, LoRALinear] = {}
    for n, m in chosen:
        if id(m) not in done:
            done[id(m)] = LoRALinear(m, cfg.r, cfg.alpha, cfg.dropout, generator=gen)
        _set(model, n, done[id(m)])
    return [n for n, _ in chosen]


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and put the plain nn.Linear back; returns how many were merged.
    Parameter names are the original model's again (state_dict() matches the unwrapped model's)."""
    done: dict[int, nn.Linear] = {}
    for n, m in lora_modules(model):
        if id(m) not in done:
            done[id(m)] = m.merged()
        _set(model, n, done[id(m)])
    return len(done)


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

