"""KV-cache bytes per token of DeepSeek-V4 (Flash-sized shapes) against DeepSeek-V3's MLA, measured and
theoretical, at 4k / 32k / 128k / 1M positions, bf16.

    .venv/bin/python benchmarks/kv_bytes_v4.py [--out benchmarks/results/kv-bytes-v4-DATE.md]

Measured: `Cache.nbytes()` of the caches our models allocate for one row of L positions, divided by L (the
attention modules are built on the meta device, so no weights are made; only the caches are real).
Theoretical, per token at context L, in bytes (2 per bf16 number):
- V3 (MLA): layers · (kv_lora_rank + qk_rope_head_dim) · 2, whatever L.
- V4: Σ_CSA (head_dim + index_head_dim) / m · 2  +  Σ_HCA head_dim / m' · 2, plus what does not grow with L:
  every layer's window of `sliding_window` K=V vectors and each compressor's pending ring (2m or m' tokens of
  projected kv + gate logits), spread over L positions.
V3.2 (MLA + a 128-wide index key per token) is the other half of issue 11 and not measured here.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

from nanoseek.models.cache import Cache
from nanoseek.models.config import DeepseekConfig, DeepseekV4Config
from nanoseek.models.mla import MLA
from nanoseek.models.v4_attention import V4Attention

LENGTHS = (4096, 32768, 131072, 1048576)


def v3_measured(cfg: DeepseekConfig, length: int) -> int:
    with torch.device("meta"):
        attn = MLA(cfg)
    return Cache([attn.new_cache(1, length, torch.bfloat16, "cpu")] * cfg.num_hidden_layers, length).nbytes()


def v4_measured(cfg: DeepseekV4Config, length: int) -> int:
    kinds = {}
    with torch.device("meta"):
        for t in set(cfg.layer_types):
            kinds[t] = V4Attention(cfg, t)
    return Cache([kinds[t].new_cache(1, length, torch.bfloat16, "cpu") for t in cfg.layer_types], length).nbytes()


def v4_theory(cfg: DeepseekV4Config, length: int) -> float:
    per_token, fixed = 0.0, 0.0
    for t in cfg.layer_types:
        fixed += cfg.sliding_window * cfg.head_dim * 2
        if t == "compressed_sparse_attention":
            m = cfg.compress_rate_csa
            per_token += (cfg.head_dim + cfg.index_head_dim) / m * 2
            fixed += 2 * m * (2 * 2 * cfg.head_dim + 2 * 2 * cfg.index_head_dim) * 2 + 2 * m * 8 * 2
        elif t == "heavily_compressed_attention":
            m = cfg.compress_rate_hca
            per_token += cfg.head_dim / m * 2
            fixed += m * 2 * cfg.head_dim * 2 + m * 8
        fixed += cfg.sliding_window * 8  # the ring's int64 positions
    return per_token + fixed / length


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    v3, v4 = DeepseekConfig(), DeepseekV4Config()
    v3_theory = v3.num_hidden_layers * (v3.kv_lora_rank + v3.qk_rope_head_dim) * 2
    n_csa = v4.layer_types.count("compressed_sparse_attention")
    n_hca = v4.layer_types.count("heavily_compressed_attention")
    intro = ("`python benchmarks/kv_bytes_v4.py`. V3: 61 MLA layers (512 + 64 per token). V4: transformers' "
             f"DeepseekV4Config defaults (Flash dims: 43 layers, {n_csa} CSA at m={v4.compress_rate_csa} with a "
             f"{v4.index_head_dim}-wide index key, {n_hca} HCA at m'={v4.compress_rate_hca}, head_dim "
             f"{v4.head_dim}, window {v4.sliding_window}).")
    lines = [f"# KV bytes per token: DeepSeek-V4 vs V3 (bf16), {datetime.date.today()}", "", intro, "",
             "| positions | V3 measured | V3 theory | V4 measured | V4 theory | V4 / V3 |", "|---|---|---|---|---|---|"]
    for length in LENGTHS:
        a, b = v3_measured(v3, length) / length, v4_measured(v4, length) / length
        lines.append(f"| {length:,} | {a:,.0f} | {v3_theory:,} | {b:,.1f} | {v4_theory(v4, length):,.1f} | "
                     f"{b / a:.3f} |")
    note = ("Measured exceeds theory by the entries buffer's one spare slot per compressor "
            "(max_len // m + 1). What does not grow with the context (every "
            "layer's window, 43 × 128 × 512 × 2 B = 5.6 MB per row, and the pending rings) adds ~3 KB/token at "
            "4k; past 32k CSA's entries and index keys (20 × 640 / 4 × 2 B = 6.4 KB/token) are nearly all of it.")
    lines += ["", note]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
