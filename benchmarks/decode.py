"""Prefill and decode speed of SmolLM2-135M on this machine: nanoseek vs transformers vs llama.cpp, one run.

    .venv/bin/python benchmarks/decode.py [--threads 2] [--new 128] [--repeats 3] [--quant int8 none]
                                          [--skip-llamacpp] [--skip-transformers] [--out benchmarks/results/decode-cpu-DATE.md]

All three read the same GGUF (the built-in Q4_1 file). Greedy, EOS suppressed, same chat-formatted prompt.
Prefill tok/s = prompt tokens / time to first token. Decode tok/s = generated tokens after the first /
the time they took; at batch 8 it is the aggregate over the 8 rows. Median of --repeats runs each.
llama.cpp's Python bindings run one sequence at a time, so it is measured at batch 1 only. Needs the
`bench` extra (llama-cpp-python) for the llama.cpp column.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py: scripts import their neighbours

PROMPT = ("Explain, step by step, how a transformer language model turns a prompt into an answer: "
          "tokenization, embeddings, attention layers with their key/value cache, the feed-forward blocks, "
          "and how the next token is chosen when sampling greedily or with a temperature. Keep it concise.")


def median(xs):
    return statistics.median(xs)


def bench_nanoseek(gguf: str, prompt_ids: list[int], new: int, batch: int, repeats: int, quant: str,
                   compile: bool = False):
    from nanoseek.engine.generate import Engine
    from nanoseek.engine.sampling import SamplingParams
    from nanoseek.weights.registry import load_model

    loaded = load_model(gguf)
    loaded.model.fuse()
    if quant != "none":
        from nanoseek.models.quant import quantize_model

        quantize_model(loaded.model, quant)
    eng = Engine(loaded.model, loaded.tokenizer, compile=compile)
    p = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    # warm-up (compiles, when asked): the batch size and a prompt length that will be seen
    eng.generate([prompt_ids] * batch, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    pre, dec = [], []
    for _ in range(repeats):
        outs = eng.generate([prompt_ids] * batch, p)
        ttft = max(o.first_token_s for o in outs)
        total = outs[0].total_s
        pre.append(batch * len(prompt_ids) / ttft)
        dec.append(sum(len(o.token_ids) - 1 for o in outs) / (total - ttft))
    return median(pre), median(dec)


def bench_transformers(gguf: str, prompt_ids: list[int], new: int, batch: int, repeats: int):
    from transformers import AutoModelForCausalLM

    path = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids] * batch)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, min_new_tokens=new, max_new_tokens=new, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, **{**kw, "min_new_tokens": 4, "max_new_tokens": 4})
        pre, dec = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=mask, **{**kw, "min_new_tokens": 1, "max_new_tokens": 1})
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, **kw)
            total = time.perf_counter() - t0
            n = out.shape[1] - ids.shape[1]
            pre.append(batch * len(prompt_ids) / ttft)
            dec.append(batch * (n - 1) / (total - ttft))
    return median(pre), median(dec)


def bench_llamacpp(gguf: str, prompt_ids: list[int], new: int, repeats: int, threads: int):
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    eos = llm.token_eos()

    def run(n_new):
        llm.reset()  # it would otherwise reuse its cache for a repeated prompt
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(n_new):
            logits = llm.scores[llm.n_tokens - 1]
            logits[eos] = -float("inf")
            llm.eval([int(logits.argmax())])
        return ttft, time.perf_counter() - t1

    run(4)
    pre, dec = [], []
    for _ in range(repeats):
        ttft, t = run(new - 1)
        pre.append(len(prompt_ids) / ttft)
        dec.append((new - 1) / t)
    return median(pre), median(dec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--quant", nargs="+", default=["int8", "none"], help="nanoseek variants to measure")
    ap.add_argument("--compile", nargs="*", default=["int4"],
                    help="also measure these nanoseek variants with torch.compile'd blocks")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", default=f"benchmarks/results/decode-cpu-{time.strftime('%Y-%m-%d-%H%M')}.md")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from nanoseek.chat import render_prompt
    from nanoseek.weights.registry import resolve

    gguf = str(resolve(a.model)[0])
    from nanoseek.weights.gguf import gguf_tokenizer

    prompt_ids = render_prompt(gguf_tokenizer(gguf), [{"role": "user", "content": PROMPT}]).ids
    rows = []  # (engine, batch, prefill, decode)
    for b in a.batches:
        for q in a.quant:
            rows.append((f"nanoseek ({'fp32' if q == 'none' else q + ' weights'})", b,
                         *bench_nanoseek(gguf, prompt_ids, a.new, b, a.repeats, q)))
            print(rows[-1], file=sys.stderr)
        for q in a.compile:
            rows.append((f"nanoseek ({'fp32' if q == 'none' else q + ' weights'}, compiled)", b,
                         *bench_nanoseek(gguf, prompt_ids, a.new, b, a.repeats, q, compile=True)))
            print(rows[-1], file=sys.stderr)
        if not a.skip_transformers:
            rows.append(("transformers generate (fp32)", b, *bench_transformers(gguf, prompt_ids, a.new, b,
                                                                                a.repeats)))
            print(rows[-1], file=sys.stderr)
        if b == 1 and not a.skip_llamacpp:
            rows.append(("llama.cpp (Q4_1)", b, *bench_llamacpp(gguf, prompt_ids, a.new, a.repeats, a.threads)))
            print(rows[-1], file=sys.stderr)

    def ref(name, b):
        return next((r for r in rows if r[0].startswith(name) and r[1] == b), None)

    lines = ["# Decode benchmark: SmolLM2-135M-Instruct (Q4_1 GGUF)\n",
             f"- machine: {cpu_name()}, {a.threads} threads, torch {torch.__version__}",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; prompt {len(prompt_ids)} tokens, {a.new} new tokens, "
             f"greedy, EOS suppressed, median of {a.repeats}",
             f"- command: `python benchmarks/decode.py {' '.join(sys.argv[1:])}`\n",
             "| engine | batch | prefill tok/s | decode tok/s | decode vs llama.cpp | decode vs transformers |",
             "|---|---|---|---|---|---|"]
    for name, b, pre, dec in rows:
        lc, tf = ref("llama.cpp", 1), ref("transformers", b)
        r_lc = f"{dec / lc[3]:.2f}x" if lc and b == 1 else ""
        r_tf = f"{dec / tf[3]:.2f}x" if tf else ""
        lines.append(f"| {name} | {b} | {pre:.0f} | {dec:.1f} | {r_lc} | {r_tf} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False) as f:
        f.write(text)
    os.replace(f.name, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
