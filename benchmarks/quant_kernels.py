"""Micro-benchmark of the weight-only linears at SmolLM2-135M shapes: time and effective bandwidth of one
matmul (fp32 / bf16 `F.linear`, Int8Linear, Int8GroupLinear, Int4Linear at several group sizes) with 1
and 2 threads at batch 1 and 8, plus each layer's relative output error against fp32 and a per-token
estimate.

    .venv/bin/python benchmarks/quant_kernels.py [--quick] [--slow-paths]

Decode streams every weight once per token and the model (≥ 70 MB even at int4) is far larger than the
last-level cache, so each timed call uses the next of several copies of the weight, enough copies to
overflow the cache; repeatedly timing one small matrix would measure cache bandwidth instead. GB/s counts
the bytes the kernel must read: codes plus scales/zeros. Times are medians over rounds interleaved across
a shape's cells (the machine may be shared).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.models.quant import KERNEL_DTYPE, Int4Linear, Int8GroupLinear, Int8Linear, int4_supported

# (name, out N, in K, how many per token in SmolLM2-135M: 30 layers, tied 49152-row head)
SHAPES = [("gate/up", 1536, 576, 60), ("down", 576, 1536, 30), ("q/o", 576, 576, 60), ("k/v", 192, 576, 60),
          ("lm_head", 49152, 576, 1)]
MODES = ["fp32", "bf16", "int8", "int8-g32", "int4-g32", "int4-g64", "int4-g128"]
STREAM_BYTES = 96 << 20  # 3× this machine's 32 MiB L3


class _FloatLinear(nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w

    def forward(self, x):
        return F.linear(x.to(self.w.dtype), self.w)


class _RawKernel(nn.Module):
    """The quantized layer's kernel fed x in x's own dtype (fp32), to show the unvectorized path."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        if isinstance(self.m, Int8Linear):
            return torch.ops.aten._weight_int8pack_mm(x, self.m.weight_int8, self.m.scales.to(x.dtype))
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.m.weight_packed, self.m.group_size,
                                                          self.m.scales_and_zeros.to(x.dtype))


def make_layer(mode: str, w: torch.Tensor) -> nn.Module | None:
    n, k = w.shape
    lin = nn.Linear(k, n, bias=False)
    lin.weight.data.copy_(w)
    if mode == "fp32":
        return _FloatLinear(w.clone())
    if mode == "bf16":
        return _FloatLinear(w.to(torch.bfloat16))
    if mode.startswith("int8") and "-g" not in mode:
        m = Int8Linear.from_linear(lin)
    else:
        g = int(mode.split("-g")[1].split("/")[0])
        if not int4_supported(n, k, g):
            return None
        m = (Int4Linear if mode.startswith("int4") else Int8GroupLinear).from_linear(lin, g)
    return _RawKernel(m) if mode.endswith("/f32x") else m


def layer_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())) + \
        sum(t.numel() * t.element_size() for t in vars(m).values() if isinstance(t, torch.Tensor))


def copies_of(m: nn.Module, count: int) -> list[nn.Module]:
    import copy
    return [m] + [copy.deepcopy(m) for _ in range(count - 1)]


@torch.inference_mode()
def time_window(layers: list[nn.Module], x: torch.Tensor, min_s: float) -> float:
    """Seconds per call over passes through `layers` lasting at least `min_s`, cycling through the copies
    so each call reads weights that are not in cache."""
    for m in layers[:4]:
        m(x)
    passes, elapsed = 0, 0.0
    t0 = time.perf_counter()
    while elapsed < min_s:
        for m in layers:
            m(x)
        passes += 1
        elapsed = time.perf_counter() - t0
    return elapsed / (passes * len(layers))


@torch.inference_mode()
def rel_err(m: nn.Module, w: torch.Tensor, x: torch.Tensor) -> float:
    ref = F.linear(x, w)
    return ((m(x).float() - ref).norm() / ref.norm()).item()


def accuracy_table(modes: list[str]) -> None:
    print("\nRelative output error vs fp32, ‖y - y_fp32‖ / ‖y_fp32‖, x ~ N(0, 1) batch 64")
    for dist in ("normal", "student-t(3)"):
        print(f"\nweights ~ {dist}")
        print(f"{'layer':<10}" + "".join(f"{m:>11}" for m in modes))
        g = torch.Generator().manual_seed(0)
        for name, n, k, _ in SHAPES:
            if dist == "normal":
                w = torch.randn(n, k, generator=g) * 0.02
            else:  # heavy tails, like real checkpoints' outlier weights
                w = torch.distributions.StudentT(3.0).sample((n, k)) * 0.02
            x = torch.randn(64, k, generator=g)
            row = f"{name:<10}"
            for mode in modes:
                m = make_layer(mode, w)
                row += f"{'n/a':>11}" if m is None else f"{rel_err(m, w, x):>11.2e}"
            print(row)


def speed_table(modes: list[str], threads: list[int], batches: list[int], rounds: int, min_s: float) -> dict:
    """Each cell is the median of `rounds` timings taken in interleaved rounds over all of a shape's cells,
    so a burst of load from another process skews one sample of many cells, not every sample of one."""
    cols = [(t, b) for b in batches for t in threads]
    print(f"\nms per call (effective GB/s of weight+scale bytes), median of {rounds} interleaved rounds; "
          "each call reads a cold copy of the weight")
    print(f"{'layer (out x in)':<22}{'mode':<14}{'MB':>7}" + "".join(f"{f'{t}thr b{b}':>17}" for t, b in cols))
    results = {}
    g = torch.Generator().manual_seed(0)
    for name, n, k, _ in SHAPES:
        w = torch.randn(n, k, generator=g) * 0.02
        built = {}
        for mode in modes:
            m = make_layer(mode, w)
            if m is not None:
                nbytes = layer_bytes(m)
                built[mode] = (copies_of(m, max(1, min(4096, STREAM_BYTES // nbytes))), nbytes)
        xs = {b: torch.randn(b, k) for b in batches}
        samples: dict[tuple, list[float]] = {}
        for _ in range(rounds):
            for mode, (layers, _) in built.items():
                for t, b in cols:
                    torch.set_num_threads(t)
                    samples.setdefault((mode, t, b), []).append(time_window(layers, xs[b], min_s))
        label = f"{name} {n}x{k}"
        for mode in modes:
            if mode not in built:
                print(f"{label:<22}{mode:<14}{'':>7}" + f"{'n/a (K % g)':>17}" * len(cols))
                continue
            nbytes = built[mode][1]
            row = f"{label:<22}{mode:<14}{nbytes / 1e6:>7.2f}"
            for t, b in cols:
                sec = statistics.median(samples[(mode, t, b)])
                results[(name, mode, t, b)] = sec
                row += f"{sec * 1e3:>9.3f} ({nbytes / sec / 1e9:>4.1f})"
            print(row, flush=True)
        del built
    return results


def token_estimate(results: dict, modes: list[str], threads: list[int]) -> None:
    """Sum of one decode step's matmul time (batch 1): 30 × the seven block linears + the head."""
    print("\nSmolLM2-135M decode, linears only (batch 1): ms/token → tok/s upper bound")
    plans = {mode: {name: mode for name, *_ in SHAPES} for mode in modes}
    # What quantize_model does for int4 at group 128: layers with K = 576 fall back to int8.
    if "int4-g128" in modes and "int8" in modes:
        plans["int4-g128"] = {name: ("int4-g128" if k % 128 == 0 else "int8") for name, n, k, _ in SHAPES}
    if "int4-g32" in modes:  # quantize_model(mode="int4")'s default (int8-group head), and alternatives
        for head in ("int8-g32", "int8", "fp32"):
            plans[f"int4-g32 + {head} head"] = {name: (head if name == "lm_head" else "int4-g32")
                                               for name, *_ in SHAPES}
    for t in threads:
        for plan_name, plan in plans.items():
            try:
                ms = sum(results[(name, plan[name], t, 1)] * count for name, _, _, count in SHAPES) * 1e3
            except KeyError:
                continue
            print(f"  {t} thr  {plan_name:<26} {ms:7.2f} ms  {1e3 / ms:6.1f} tok/s")
    print("  (×211 calls/token, add the wrappers' overhead and attention/norms for the real decode rate)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, shorter timing windows")
    ap.add_argument("--slow-paths", action="store_true",
                    help="also time the kernels fed fp32 activations (their unvectorized path)")
    args = ap.parse_args()
    modes = MODES + (["int8/f32x", "int4-g32/f32x"] if args.slow_paths else [])
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
          f"quantized kernels run in {KERNEL_DTYPE}")
    torch.set_num_threads(2)
    accuracy_table(MODES)
    rounds, min_s = (3, 0.03) if args.quick else (7, 0.08)
    results = speed_table(modes, [1, 2], [1, 8], rounds, min_s)
    token_estimate(results, MODES, [1, 2])


if __name__ == "__main__":
    main()
