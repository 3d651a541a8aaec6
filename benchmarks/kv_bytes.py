"""KV-cache bytes per token, measured (Cache.nbytes of a real cache) against theoretical, per model kind.

    .venv/bin/python benchmarks/kv_bytes.py [--positions 4096 32768 131072] [--dtype bfloat16]
                                            [--out benchmarks/results/kv-bytes-DATE.md]

Models are built on the meta device, so full-size configs cost no memory: the cache tensors have shapes and
dtypes but no storage, and `Cache.nbytes` counts numel × element size of every tensor each layer kind keeps
(one row of `positions` slots). "Theoretical" is each kind's own formula from its paper, written
independently of the cache code below in KINDS; a ratio of 1.000 says the cache stores what the paper says
and nothing more. To add a model kind, append a Kind to KINDS.

V4's caches do not grow one slot per position: a CSA/HCA layer keeps one compressed entry per m (m') tokens,
plus state that does not grow with the context (every layer's window of `sliding_window` keys and each
compressor's ring of pending tokens); its theoretical bytes per token are the growing part plus the fixed part
spread over the positions, so V4's figure falls with the context while MLA's is constant.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.models import build_model
from nanoseek.models.config import DeepseekConfig, DeepseekV4Config, DeepseekV32Config


@dataclass
class Kind:
    name: str
    config: Callable[[], object]
    theory: Callable[[object, int, int], float]  # (config, positions, bytes per element) → bytes per token
    formula: str


def _mla(c, n, b) -> float:
    # V2 §2.1.2: per layer and token, the latent c_KV (kv_lora_rank) and the shared rope key (qk_rope_head_dim)
    return c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * b


def _dsa(c, n, b) -> float:
    # V3.2 §2.1: MLA's latent plus one index key (index_head_dim) per layer and token
    return _mla(c, n, b) + c.num_hidden_layers * c.index_head_dim * b


def _v4(c, n, b) -> float:
    # V4 §2.3: per token, CSA's entry (head_dim) and index key (index_head_dim) every m tokens, HCA's entry every
    # m' tokens; fixed per row: every layer's window (W keys of head_dim + an int64 position each) and each
    # compressor's ring of pending tokens (projected kv and gate logits, 2·head_dim wide for CSA's overlapping
    # windows, + an int64 position; 2m slots for CSA, m' for HCA)
    grows, fixed = 0.0, 0.0
    for t in c.layer_types:
        fixed += c.sliding_window * (c.head_dim * b + 8)
        if t == "compressed_sparse_attention":
            m = c.compress_rate_csa
            grows += (c.head_dim + c.index_head_dim) / m * b
            fixed += 2 * m * (2 * 2 * (c.head_dim + c.index_head_dim) * b + 2 * 8)
        elif t == "heavily_compressed_attention":
            m = c.compress_rate_hca
            grows += c.head_dim / m * b
            fixed += m * (2 * c.head_dim * b + 8)
    return grows + fixed / n


def _preset(name: str) -> Callable[[], object]:
    """A training preset's model (configs/NAME.toml), vocabulary 512 as the tiny runs use."""
    def make():
        from nanoseek.train.config import load_config

        return load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml").model_config(512)
    return make


KINDS = [
    Kind("DeepSeek-V3 (MLA)", DeepseekConfig, _mla, "L·(kv_lora + rope)"),
    Kind("DeepSeek-V3.2 (MLA + DSA index keys)", DeepseekV32Config, _dsa, "L·(kv_lora + rope + index_head_dim)"),
    Kind("DeepSeek-V4 (Flash dims: sliding / CSA / HCA)", DeepseekV4Config, _v4,
         "Σ_CSA (D + index_D)/m + Σ_HCA D/m' + fixed/positions"),
    Kind("tiny (configs/tiny.toml)", _preset("tiny"), _mla, "L·(kv_lora + rope)"),
    Kind("tiny-v32 (configs/tiny-v32.toml)", _preset("tiny-v32"), _dsa, "L·(kv_lora + rope + index_head_dim)"),
    Kind("tiny-v4 (configs/tiny-v4.toml)", _preset("tiny-v4"), _v4,
         "Σ_CSA (D + index_D)/m + Σ_HCA D/m' + fixed/positions"),
]


def measure(kind: Kind, positions: int, dtype: torch.dtype) -> tuple[int, float]:
    """(Cache.nbytes for one row of `positions` slots, theoretical bytes per token)."""
    cfg = kind.config()
    with torch.device("meta"):
        model = build_model(cfg)
    cache = model.new_cache(1, positions, dtype=dtype, device="meta")
    return cache.nbytes(), kind.theory(cfg, positions, torch.empty(0, dtype=dtype).element_size())


def table(positions: list[int], dtype: torch.dtype) -> str:
    lines = [f"| model | positions | Cache.nbytes | measured B/token | theoretical B/token | measured/theory | formula ({dtype}) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for kind in KINDS:
        for n in positions:
            total, theory = measure(kind, n, dtype)
            lines.append(f"| {kind.name} | {n:,} | {total:,} | {total / n:,.1f} | {theory:,.1f} | "
                         f"{total / n / theory:.4f} | {kind.formula} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--positions", type=int, nargs="+", default=[4096, 32768, 131072])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", type=Path, default=None, help="also write the table, with a header, to this file")
    a = ap.parse_args(argv)
    text = table(a.positions, getattr(torch, a.dtype))
    print(text)
    if a.out:
        cmd = "benchmarks/kv_bytes.py " + " ".join(sys.argv[1:] if argv is None else argv)
        a.out.write_text(f"# KV-cache bytes per token, {datetime.date.today()}\n\nCommand: `{cmd}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
