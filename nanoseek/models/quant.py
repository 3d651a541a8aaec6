"""Weight-only quantization for inference: int8 per-channel and int4 group-wise linears, and
`quantize_model`, which swaps a model's `nn.Linear`s for them in place.

Decode at batch 1 is bound by how many weight bytes each token streams from memory, so storing weights in
fewer bits speeds it up even though activations (and the arithmetic) stay in floating point. Both layers
run on torch's own CPU kernels and fall back to a dequantize-then-matmul path elsewhere (other devices,
other activation dtypes), which is correct but not fast.

- Int8Linear: w ≈ q·s with q ∈ [-127, 127] per output row, s = max|w_row| / 127.
  Kernel: `aten._weight_int8pack_mm(x [M, K], q [N, K] int8, s [N])`; s must have x's dtype.
- Int4Linear: per row and per group of `group_size` input columns, w ≈ (q - 8)·s + z with q ∈ [0, 15]
  (asymmetric: the group's min maps to code 0 and its max to code 15).
  Kernels: `aten._convert_weight_to_int4pack_for_cpu(q [N, K] int32, inner_k_tiles)` → uint8 [N, K/2] in
  a kernel-private, ISA-dependent layout, and `aten._weight_int4pack_mm_for_cpu(x [M, K], packed,
  group_size, scales_and_zeros [K/group_size, N, 2])`, where [..., 0] is s and [..., 1] is z, in x's dtype.
  Needs N % 16 == 0 and K % group_size == 0 with group_size in {32, 64, 128, 256}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _scale_dtype(w: torch.Tensor) -> torch.dtype:
    # Scales live in the weight's dtype, which is the activation dtype the model runs in: the kernels want
    # scales in x's dtype, and storing them that way saves a cast per call.
    return w.dtype if w.dtype in _KERNEL_DTYPES else torch.float32


def _use_kernel(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES


# ---- int8 ----------------------------------------------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] → (q [N, K] int8, scales [N] fp32) with w ≈ q * scales[:, None]."""
    w = w.detach().float()
    # Symmetric range ±127 (not -128) so that negating a row never overflows.
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """Linear with int8 per-output-channel weights. Buffers: `weight_int8` [N, K], `scales` [N]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        w = lin.weight
        dt = _scale_dtype(w)
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, dt, w.device)
        q, s = quantize_int8(w)
        m.weight_int8.copy_(q)
        m.scales.copy_(s.to(dt))
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.detach())
        return m

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [N, K] these int8 codes stand for (as the kernel sees it: scales in their stored dtype)."""
        w = self.weight_int8.float() * self.scales.float()[:, None]
        return w.to(dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if _use_kernel(x2):
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scales.to(x.dtype))
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ---- int4 ----------------------------------------------------------------------------------------------

def int4_supported(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether the CPU int4 kernel accepts an [N=out, K=in] weight with this group size."""
    return (group_size in INT4_GROUP_SIZES and in_features % group_size == 0 and out_features % 16 == 0)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] → (q [N, K] int32 codes in 0..15, scales_and_zeros [K/g, N, 2] fp32) with
    w[n, k] ≈ (q[n, k] - 8) * s[k // g, n] + z[k // g, n]."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features={k} is not a multiple of group_size={group_size}")
    g = w.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    # A constant group gets a tiny positive scale so the division is defined; all its codes become 0 and
    # it dequantizes exactly to its value.
    scales = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.int32).reshape(n, k)
    # The kernel subtracts 8 from every code, so the group minimum sits at zero = lo + 8·s.
    zeros = lo + 8.0 * scales
    return q, torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reference inverse of `quantize_int4` from unpacked codes: → w [N, K] fp32."""
    s = scales_and_zeros[..., 0].float().t().repeat_interleave(group_size, dim=1)
    z = scales_and_zeros[..., 1].float().t().repeat_interleave(group_size, dim=1)
    return (q.float() - 8.0) * s + z


class Int4Linear(nn.Module):
    """Linear with group-wise asymmetric int4 weights. Buffers: `weight_packed` uint8 [N, K/2] in the CPU
    kernel's layout (it depends on the CPU's vector ISA, so quantize on the machine that runs the model
    rather than shipping these buffers) and `scales_and_zeros` [K/group_size, N, 2]."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 32, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if not int4_supported(out_features, in_features, group_size):
            raise ValueError(f"int4 kernel cannot take out={out_features}, in={in_features}, group={group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                          device=device))
        self.register_buffer("scales_and_zeros", torch.zeros(in_features // group_size, out_features, 2,
                                                             dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int = 32) -> Int4Linear:
        w = lin.weight
        dt = _scale_dtype(w)
        m = cls(lin.in_features, lin.out_features, group_size, lin.bias is not None, dt, w.device)
        q, sz = quantize_int4(w, group_size)
        # Packing only exists as a CPU op; the packed bytes then move to wherever the weight lives.
        m.weight_packed.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.cpu(), 1))
        m.scales_and_zeros.copy_(sz.to(dt))
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.detach())
        return m

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.weight_packed, self.group_size,
                                                          self.scales_and_zeros.to(x2.dtype))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [N, K] the packed codes stand for. The packed layout is private to the kernel, so this
        runs the kernel on an identity matrix: row k of I·Wᵀ is column k of W, exactly (one nonzero term)."""
        dt = self.scales_and_zeros.dtype
        packed, sz = self.weight_packed.cpu(), self.scales_and_zeros.cpu()
        eye = torch.eye(self.in_features, dtype=dt)
        wt = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, self.group_size, sz)
        return wt.t().contiguous().to(device=self.weight_packed.device, dtype=dtype or dt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = self._mm(x2) if _use_kernel(x2) else F.linear(x2, self.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


# ---- whole model ---------------------------------------------------------------------------------------

@dataclass
class QuantSummary:
    """What `quantize_model` did. Byte counts are of the model's unique parameter and buffer storage."""

    mode: str
    int8: list[str] = field(default_factory=list)
    int4: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        mb = 1 << 20
        return (f"quantize {self.mode}: {len(self.int4)} int4, {len(self.int8)} int8, {len(self.skipped)} kept "
                f"float; {self.bytes_before / mb:.1f} MiB → {self.bytes_after / mb:.1f} MiB")


def model_bytes(model: nn.Module) -> int:
    """Bytes of unique tensor storage held by parameters and buffers (a tied weight counts once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = 32,
                   skip: tuple[str, ...] = ("kv_b_proj",)) -> QuantSummary:
    """Replace every `nn.Linear` in `model` with an Int8Linear or Int4Linear, in place.

    - mode "none" changes nothing; "int8" quantizes every linear to int8; "int4" uses int4 where the
      kernel accepts the shape (K % group_size == 0, N % 16 == 0) and int8 elsewhere.
    - Linears whose attribute name is in `skip` stay float: MLA's absorbed decode path reads
      `kv_b_proj.weight` directly. Routed experts and routers hold raw parameters, not `nn.Linear`s, so
      they stay float too; MoE shared experts are ordinary linears and are quantized.
    - A head tied to the embedding gets its own quantized copy; the embedding stays float, since a lookup
      reads one row per token and costs nothing worth compressing.
    """
    if mode not in MODES:
        raise ValueError(f"quantization mode must be one of {MODES}, got {mode!r}")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    summary = QuantSummary(mode, bytes_before=model_bytes(model))
    if mode != "none":
        # Every path, duplicates included, so a linear shared by two parents is replaced under both by
        # one quantized module.
        targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if type(m) is nn.Linear]
        done: dict[int, nn.Module] = {}
        for name, lin in targets:
            parent_name, _, attr = name.rpartition(".")
            if attr in skip:
                summary.skipped.append(name)
                continue
            if id(lin) not in done:
                if mode == "int4" and int4_supported(lin.out_features, lin.in_features, group_size):
                    done[id(lin)] = Int4Linear.from_linear(lin, group_size)
                else:
                    done[id(lin)] = Int8Linear.from_linear(lin)
                (summary.int4 if isinstance(done[id(lin)], Int4Linear) else summary.int8).append(name)
            setattr(model.get_submodule(parent_name), attr, done[id(lin)])
    summary.bytes_after = model_bytes(model)
    return summary
