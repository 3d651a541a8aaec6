"""Building blocks shared by every family: RMSNorm, rotary embeddings (default, linear, llama3, YaRN), SwiGLU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.models.cache import Positions
from nanoseek.models.config import RopeConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel; bit-identical to the explicit form in fp32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalize in fp32 as the reference does; low-precision variance drifts visibly in bf16. The fused
        # kernel without weight is the explicit x·rsqrt(mean(x²) + eps) in fp32, in one kernel instead of
        # four (decode at batch 1 is bound by kernel count: 2 norms per layer).
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), the FFN of Llama, Qwen2 and DeepSeek's dense and shared experts."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def fuse(self) -> None:
        """Inference only: one [2·hidden, dim] matmul instead of two (fewer kernel launches per token)."""
        self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj


def fuse_linears(*linears: nn.Linear) -> nn.Linear:
    """One Linear computing the concatenated outputs of `linears` (same input)."""
    w = torch.cat([lin.weight for lin in linears])
    has_bias = any(lin.bias is not None for lin in linears)
    fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(w, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([lin.bias if lin.bias is not None else w.new_zeros(lin.out_features)
                                             for lin in linears]), requires_grad=False)
    return fused


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (YaRN paper §3.4, as DeepSeek-V2 App. uses it): 0.1·m·ln(s) + 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(rope: RopeConfig, dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scale for one rotary configuration."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scale = 1.0
    if rope.rope_type == "linear":
        inv = inv / rope.factor
    elif rope.rope_type == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, a smooth blend in between.
        old = rope.original_max_position_embeddings or max_positions
        low_wl, high_wl = old / rope.low_freq_factor, old / rope.high_freq_factor
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > low_wl, inv / rope.factor, inv)
        smooth = (old / wl - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wl >= high_wl) & (wl <= low_wl)
        inv = torch.where(medium, blended, scaled)
    elif rope.rope_type == "yarn":
        # YaRN (Peng et al. 2023 §3.2): dims that rotate fewer than beta_slow times over the original
        # context are interpolated (÷factor), those above beta_fast extrapolated (kept), linear ramp between.
        orig = rope.original_max_position_embeddings or max_positions

        def corr_dim(rot: float) -> float:
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(rope.theta))

        low, high = corr_dim(rope.beta_fast), corr_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp
        inv = (inv / rope.factor) * (1 - keep) + inv * keep
        if rope.attention_factor is not None:
            scale = rope.attention_factor
        elif rope.mscale and rope.mscale_all_dim:
            scale = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
        else:
            scale = yarn_mscale(rope.factor)
    return inv, scale


class Rotary(nn.Module):
    """Precomputed cos/sin tables indexed by absolute position.

    `interleaved=False` rotates (x[i], x[i+d/2]) pairs (Llama/Qwen2 weight layout); `interleaved=True` rotates
    adjacent pairs (x[2i], x[2i+1]), DeepSeek's layout. The interleaved output is written de-interleaved
    (evens then odds): queries and keys get the same permutation, so their dot products are unchanged and we
    skip a strided copy.
    """

    def __init__(self, rope: RopeConfig, dim: int, max_positions: int, interleaved: bool = False):
        super().__init__()
        self.interleaved = interleaved
        self.rope, self.dim, self.max_positions = rope, dim, max_positions
        self._build(max_positions)

    def _build(self, n: int) -> None:
        inv, scale = rope_frequencies(self.rope, self.dim, self.max_positions)
        ang = torch.outer(torch.arange(n, dtype=torch.float32), inv)
        self.register_buffer("cos", ang.cos() * scale, persistent=False)
        self.register_buffer("sin", ang.sin() * scale, persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype, need: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [*positions.shape, dim/2] for integer `positions` (need = max + 1, if known)."""
        if need is None:
            need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self.cos.shape[0]:  # past the table: grow it (positions beyond the trained range still work)
            self._build(max(need, 2 * self.cos.shape[0]))
            self.cos, self.sin = self.cos.to(positions.device), self.sin.to(positions.device)
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)

    def positions(self, pos: torch.Tensor, dtype: torch.dtype, cached: bool, window: int | None = None
                  ) -> Positions:
        """`window`: a fixed number of cached keys to read (a static-shape decode step: no host sync, the
        mask always built); the table must already cover every position in `pos` (`tables(..., need)`)."""
        if window is not None:
            cos, sin = self.tables(pos, dtype, 0)
            return Positions.build(pos, cos, sin, cached, self.interleaved, window, window=True)
        length = int(pos.max()) + 1  # one host sync per forward, shared by the table lookup and the mask
        cos, sin = self.tables(pos, dtype, length)
        return Positions.build(pos, cos, sin, cached, self.interleaved, length)


def apply_rotary(x: torch.Tensor, at: Positions) -> torch.Tensor:
    """Rotate `x` [B, T, H, dim] to the positions in `at`, in the pair layout its table was built for."""
    cos, sin = at.cos.unsqueeze(2), at.sin.unsqueeze(2)
    if at.interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
