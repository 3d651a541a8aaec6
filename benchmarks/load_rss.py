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
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if kind == "nanoseek":
    from nanoseek.weights.registry import load_model
    m = load_model(spec, dtype=dtype).model
else:
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
dt = time.perf_counter() - t0
params = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "import_kb": base,
                  "seconds": dt, "param_bytes": params}))
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
             "peak = ru_maxrss of a fresh process, minus the same process's RSS after imports\n",
             "| loader | checkpoint | file size | weights in memory | peak RSS over imports | load s |",
             "|---|---|---|---|---|---|"]
    for kind, spec, dtype in cases:
        r = measure(kind, spec, dtype)
        grow = (r["peak_kb"] - r["import_kb"]) * 1024
        lines.append(f"| {kind} ({dtype}) | {Path(spec).name} | {size_of(Path(spec)) / 2**20:.0f} MiB | "
                     f"{r['param_bytes'] / 2**20:.0f} MiB | {grow / 2**20:.0f} MiB | {r['seconds']:.1f} |")
        print(lines[-1], file=sys.stderr)
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
