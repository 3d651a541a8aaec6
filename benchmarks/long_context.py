"""Prefill and decode time against context length for the tiny presets (V3: MLA; V3.2: MLA + DSA; V4:
sliding / CSA / HCA attention) on CPU.

    PYTHONPATH=. .venv/bin/python benchmarks/long_context.py [--contexts 1024 2048 4096 8192 16384 32768]
        [--presets tiny tiny-v32 tiny-v4] [--decode 16] [--chunk 256] [--threads 1] [--prefill-max 8192]
        [--out benchmarks/results/long-context-cpu-DATE.md]

Each model is random (the presets' init), vocabulary 512, fp32, batch 1. Prefill runs the context through the
cache in chunks of --chunk tokens (as the engine does); decode then times --decode single-token steps at that
context and reports the median. Past --prefill-max the cache is filled with random numbers instead of a
prefill (a decode step's cost does not depend on the cached values), so long contexts cost seconds, not
minutes. Times are process CPU time (time.process_time, 1 thread by default) next to wall time: on a shared
machine the wall clock mostly measures the neighbours. One run per cell: the figures are for the shape of the
curves, not the third digit. V4's caches are not spans of positions, so its random fill sets each
window and compressor ring to hold the last positions before the context's end and fills every entry.
DSA's decode attends over index_topk picked latents (its cost stops growing with the context) but
its indexer still scores every cached token; its prefill masks dense attention, so it only adds work there.
V4's decode reads a window of sliding_window keys, every HCA entry (one per m' tokens) and index_topk CSA
entries, after its indexer scores every CSA entry (one per m tokens).
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py: scripts import their neighbours

from nanoseek.models import build_model
from nanoseek.models.cache import CompressedLayer, CompressorState, WindowLayer
from nanoseek.train.config import load_config
from nanoseek.train.pretrain import init_weights

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def build(preset: str):
    cfg = load_config(CONFIGS / f"{preset}.toml")
    torch.manual_seed(0)
    model = build_model(cfg.model_config(512, 0, 1))
    init_weights(model, cfg.train.init_std)
    return model.eval()


def _ring(tensors_pos: torch.Tensor, context: int) -> None:
    """Make a ring of R position slots hold the R positions before `context` (slot p % R)."""
    r = tensors_pos.shape[1]
    p = torch.arange(max(0, context - r), context)
    tensors_pos[:, p % r] = p


def fill_random(cache, context: int) -> None:
    """Fill the cache as if `context` tokens had been prefilled, with random numbers for the values."""
    for layer in cache.layers:
        if isinstance(layer, (WindowLayer, CompressedLayer)):
            window = layer.window if isinstance(layer, CompressedLayer) else layer
            window.kv.normal_()
            _ring(window.pos, context)
            comps = [] if isinstance(layer, WindowLayer) else [c for c in (layer.comp, layer.index) if c]
            for c in comps:
                assert isinstance(c, CompressorState)
                for t in (c.pend_kv, c.pend_gate, c.entries):
                    t.normal_()
                _ring(c.pend_pos, context)
        else:
            for t in layer.span(0, 0, context):
                t.normal_()


@torch.inference_mode()
def run(model, context: int, decode: int, chunk: int, prefill: bool) -> tuple[float, float, float, float]:
    """(prefill CPU s, prefill wall s, median decode CPU ms, median decode wall ms) at `context` tokens;
    prefill figures are NaN when the cache was filled at random instead."""
    ids = torch.randint(2, 512, (1, context), generator=torch.Generator().manual_seed(context))
    cache = model.new_cache(1, context + decode)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if prefill:
        for s in range(0, context, chunk):
            part = ids[:, s:s + chunk]
            model(part, torch.arange(s, s + part.shape[1])[None], cache, last_only=True)
        pre = (time.process_time() - cpu0, time.perf_counter() - wall0)
    else:
        fill_random(cache, context)
        pre = (float("nan"), float("nan"))
    tok, cpu, wall = ids[:, -1:], [], []
    for i in range(decode):
        c0, w0 = time.process_time(), time.perf_counter()
        logits = model(tok, torch.tensor([[context + i]]), cache)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        tok = logits[:, -1].argmax(-1, keepdim=True)
    return *pre, 1000 * statistics.median(cpu), 1000 * statistics.median(wall)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--presets", nargs="+", default=["tiny", "tiny-v32", "tiny-v4"])
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefill-max", type=int, default=8192, help="longer contexts: random cache, no prefill")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    models = {p: build(p) for p in a.presets}
    for p, m in models.items():
        extra = f", index_topk {m.config.index_topk}" if hasattr(m.config, "index_topk") else ""
        print(f"{p}: {sum(t.numel() for t in m.parameters()) / 1e6:.2f}M params{extra}", file=sys.stderr)
    head = " | ".join(f"{p} prefill CPU s (wall) | {p} decode CPU ms (wall)" for p in a.presets)
    lines = [f"| context | {head} |", "|---:|" + "---:|" * (2 * len(a.presets))]
    for n in a.contexts:
        cells = []
        for p, m in models.items():
            pc, pw, dc, dw = run(m, n, a.decode, a.chunk, n <= a.prefill_max)
            cells += ["—" if math.isnan(pc) else f"{pc:.2f} ({pw:.2f})", f"{dc:.2f} ({dw:.2f})"]
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines)
    print(text)
    if a.out:
        cmd = "benchmarks/long_context.py " + " ".join(sys.argv[1:] if argv is None else argv)
        a.out.write_text(f"# Long context on CPU, {datetime.date.today()}\n\n{cpu_name()}, {a.threads} threads, "
                         f"torch {torch.__version__}. Command: `{cmd}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
