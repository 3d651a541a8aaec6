"""Peak resident memory while loading a checkpoint, vs its file size: does loading stay near model size?

    .venv/bin/python benchmarks/load_rss.py [--make-1b DIR] [--out benchmarks/results/load-rss.md]

Each load runs in a fresh subprocess (ru_maxrss of a child is its own peak). Models: the built-in
SmolLM2 GGUF (dequantized to fp32, so its in-memory size is ~4x the Q4_1 file), and a 1B-class random
Llama checkpoint in bf16 safetensors written once by transformers (--make-1b; reused if present),
loaded by nanoseek in bf16 and by transformers for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
kind, spec, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
from transformers import AutoModelForCausalLM
from nanoseek.weights.registry import load_model
def rss_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
base = rss_kb()
t0 = time.perf_counter()
if kind == "nanoseek":
    m = load_model(spec, dtype=dtype).model
else:
    m = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
dt = time.perf_counter() - t0
loaded = rss_kb()
with torch.inference_mode():  # touches every weight: memory-mapped pages become resident here
    m(torch.zeros(1, 8, dtype=torch.long))
params = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({"base_kb": base, "loaded_kb": loaded, "peak_kb": rss_kb(), "seconds": dt,
                  "param_bytes": params}))
"""


def measure(kind: str, spec: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, spec, dtype], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_1b(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--make-1b", default=os.path.join(tempfile.gettempdir(), "nanoseek-llama-1b"))
    ap.add_argument("--out", default="benchmarks/results/load-rss.md")
    a = ap.parse_args()
    from nanoseek.weights.registry import resolve

    one_b = Path(a.make_1b)
    if not (one_b / "config.json").exists():
        print(f"writing a random 1.1B Llama to {one_b} ...", file=sys.stderr)
        make_1b(one_b)
    cases = [("nanoseek", str(resolve("smollm2-135m")[0]), "float32"),
             ("nanoseek", str(one_b), "bfloat16"),
             ("transformers", str(one_b), "bfloat16")]
    lines = ["# Peak RSS while loading\n", f"- date: {time.strftime('%Y-%m-%d %H:%M')}; "
             "RSS = ru_maxrss of a fresh process minus its RSS after imports; 'after load' is right after the "
             "loader returns (memory-mapped weights not yet read), 'after forward' once one forward pass has "
             "touched every weight\n",
             "| loader | checkpoint | file size | weights in memory | peak RSS after load | peak RSS after forward "
             "| load s |",
             "|---|---|---|---|---|---|---|"]
    for kind, spec, dtype in cases:
        r = measure(kind, spec, dtype)
        after_load, after_fwd = ((r[k] - r["base_kb"]) / 1024 for k in ("loaded_kb", "peak_kb"))
        lines.append(f"| {kind} ({dtype}) | {Path(spec).name} | {size_of(Path(spec)) / 2**20:.0f} MiB | "
                     f"{r['param_bytes'] / 2**20:.0f} MiB | {after_load:.0f} MiB | {after_fwd:.0f} MiB | "
                     f"{r['seconds']:.1f} |")
        print(lines[-1], file=sys.stderr)
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
