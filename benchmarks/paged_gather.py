"""Why running requests keep contiguous cache rows on CPU: decode attention over a dense row vs over pages.

A paged KV cache (vLLM's PagedAttention) needs a kernel that reads pages in place; torch's CPU SDPA has none,
so pages would have to be gathered into a dense tensor every layer of every step. This times one decode
attention call (one query token per row) both ways at SmolLM2-135M's shapes. nanoseek therefore pages only
its prefix-cache pool (engine/prefix.py), whose blocks are copied into a row once per request.

    python benchmarks/paged_gather.py [--batch 16] [--context 1024] [--block 16]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    B, L, bs, hkv, d = a.batch, a.context, a.block, a.kv_heads, a.head_dim
    nb = L // bs
    table = Table(title=f"decode attention, batch {B}, context {L}, block {bs} ({torch.get_num_threads()} threads)")
    for col in ("dtype", "dense row ms", "gathered pages ms", "pages / dense"):
        table.add_column(col)
    for dt in (torch.float32, torch.bfloat16):
        q = torch.randn(B, a.heads, 1, d, dtype=dt)
        k, v = torch.randn(B, hkv, L, d, dtype=dt), torch.randn(B, hkv, L, d, dtype=dt)
        pool_k, pool_v = torch.randn(B * nb, hkv, bs, d, dtype=dt), torch.randn(B * nb, hkv, bs, d, dtype=dt)
        pages = torch.randperm(B * nb).view(B, nb)

        def dense():
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        def paged():
            kk = pool_k[pages].permute(0, 2, 1, 3, 4).reshape(B, hkv, L, d)
            vv = pool_v[pages].permute(0, 2, 1, 3, 4).reshape(B, hkv, L, d)
            return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)

        td, tp = timed(dense, a.reps), timed(paged, a.reps)
        table.add_row(str(dt).removeprefix("torch."), f"{td:.2f}", f"{tp:.2f}", f"{tp / td:.1f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
