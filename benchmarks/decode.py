"""Prefill and decode speed of SmolLM2-135M on this machine: nanoseek vs llama.cpp (and transformers), one run.

    .venv/bin/python benchmarks/decode.py [--threads 2] [--new 128] [--repeats 5] [--quant int4]
        [--batches 1 8] [--torch-path] [--compile] [--fp32] [--transformers] [--skip-llamacpp]
        [--speculative ngram draft=MODEL] [--prompt explain|repeat|edit|code]
        [--out benchmarks/results/decode-cpu-DATE.md]

Everything reads the same GGUF (the built-in Q4_1 file). Greedy, EOS suppressed, same chat-formatted prompt.
Prefill tok/s = prompt tokens / time to first token. Decode tok/s = generated tokens after the first / the
time they took; at batch > 1 the aggregate over the rows.

The table is data-driven: `rows` is a list of `Row(name, batch, setup)`; `setup()` loads its engine, warms it
up and returns a callable that measures once (→ `Measure`). Rows are measured interleaved (repeat r of every
row, then repeat r + 1), because these shared VMs drift by ±25% within minutes: medians of interleaved runs
compare, separate runs do not. A new row (a speculative drafter, with its acceptance rate in `note`) is one more
entry in the list.

llama.cpp runs at every setting that might be its best on this machine (1 and `--threads` threads, flash
attention on and off); the ratio column divides by the best of them. Needs the `bench` extra
(llama-cpp-python) for those rows; on AMX hosts the default build of llama-cpp-python crashes, see
../shared/reference/baselines.md for the build that works.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from machine import (  # benchmarks/machine.py: scripts import their neighbours
    cpu_flags,
    cpu_name,
)
from speculative import (
    PROMPTS as SPEC_PROMPTS,  # benchmarks/speculative.py's repeat / edit / code prompts
)

PROMPT = ("Explain, step by step, how a transformer language model turns a prompt into an answer: "
          "tokenization, embeddings, attention layers with their key/value cache, the feed-forward blocks, "
          "and how the next token is chosen when sampling greedily or with a temperature. Keep it concise.")
CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_int8", "amx_bf16")


@dataclass
class Measure:
    prefill: float  # tok/s
    decode: float   # tok/s
    note: str = ""


@dataclass
class Row:
    name: str
    batch: int
    setup: Callable[[], Callable[[], Measure]]
    results: list[Measure] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(m, attr) for m in self.results)


def cpu_features() -> str:
    """The decode-relevant CPU_FLAGS this CPU has, for the results header."""
    have = cpu_flags()
    if not have:   # no /proc/cpuinfo flags line to read
        return "unknown"
    return ", ".join(f for f in CPU_FLAGS if f in have) or "none of " + ", ".join(CPU_FLAGS)


def nanoseek_row(gguf: str, prompt_ids: list[int], new: int, batch: int, quant: str, *, native: bool,
                 threads: int, compile: bool = False, drafter: str | None = None) -> Callable[[], Callable[[], Measure]]:
    def setup():
        torch.set_num_threads(threads)
        from nanoseek.engine.generate import Engine
        from nanoseek.engine.sampling import SamplingParams
        from nanoseek.models.cpu_decode import attach
        from nanoseek.models.quant import quantize_model
        from nanoseek.weights.registry import load_model

        loaded = load_model(gguf)
        loaded.model.fuse()
        if native and (why := attach(loaded.model, quant)):
            raise RuntimeError(f"native decode unavailable: {why}")
        if quant != "none":
            quantize_model(loaded.model, quant)
        draft = None
        if drafter is not None:  # speculative rows (engine/draft.py): lossless, so the output is the same
            from nanoseek.session import LoadOptions, make_drafter

            draft = make_drafter(LoadOptions(speculative=drafter, quant=quant), loaded.model)
        eng = Engine(loaded.model, loaded.tokenizer, compile=compile, drafter=draft)
        p = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        # warm-up (compiles, when asked): the batch size and a prompt length that will be seen
        eng.generate([prompt_ids] * batch, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))

        def run() -> Measure:
            torch.set_num_threads(threads)  # rows at other thread counts run in between
            outs = eng.generate([prompt_ids] * batch, p)
            ttft = max(o.first_token_s for o in outs)
            total = outs[0].total_s
            note = ""
            if drafter is not None:
                st = eng.loop.stats()
                note = (f"{drafter}: {st['spec_acceptance_rate'] or 0:.0%} of drafts accepted, "
                        f"{st['spec_tokens_per_step'] or 1:.2f} tokens per verify step")
            return Measure(batch * len(prompt_ids) / ttft, sum(len(o.token_ids) - 1 for o in outs) / (total - ttft),
                           note)
        return run
    return setup


def llamacpp_row(gguf: str, prompt_ids: list[int], new: int, threads: int, flash: bool):
    def setup():
        from llama_cpp import Llama

        llm = Llama(model_path=gguf, n_ctx=1024, n_threads=threads, n_threads_batch=threads, flash_attn=flash,
                    verbose=False)
        eos = llm.token_eos()

        def once(n_new):
            llm.reset()  # it would otherwise reuse its cache for a repeated prompt
            t0 = time.perf_counter()
            llm.eval(prompt_ids)
            ttft = time.perf_counter() - t0
            t1 = time.perf_counter()
            for _ in range(n_new):
                logits = llm.scores[llm.n_tokens - 1]
                logits[eos] = -float("inf")
                llm.eval([int(logits.argmax())])
            return Measure(len(prompt_ids) / ttft, n_new / (time.perf_counter() - t1))

        once(4)
        return lambda: once(new - 1)
    return setup


def transformers_row(gguf: str, prompt_ids: list[int], new: int, batch: int):
    def setup():
        from transformers import AutoModelForCausalLM

        path = Path(gguf)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        ids = torch.tensor([prompt_ids] * batch)
        kw = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}

        def gen(n):
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = model.generate(ids, min_new_tokens=n, max_new_tokens=n, **kw)
                return time.perf_counter() - t0, out.shape[1] - ids.shape[1]

        gen(4)

        def run() -> Measure:
            ttft, _ = gen(1)
            total, n = gen(new)
            return Measure(batch * len(prompt_ids) / ttft, batch * (n - 1) / (total - ttft))
        return run
    return setup


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1])
    ap.add_argument("--quant", default="int4", help="nanoseek's weights (int4 matches the Q4_1 file)")
    ap.add_argument("--torch-path", action="store_true", help="also nanoseek without the native decode step")
    ap.add_argument("--compile", action="store_true", help="also nanoseek's PyTorch path with compiled blocks")
    ap.add_argument("--fp32", action="store_true", help="also nanoseek with float32 weights")
    ap.add_argument("--transformers", action="store_true", help="also transformers generate (fp32)")
    ap.add_argument("--speculative", nargs="*", default=[], metavar="SPEC",
                    help="also nanoseek (native step) with these drafters: ngram, draft=MODEL (speculative rows)")
    ap.add_argument("--prompt", default="explain", choices=["explain", *SPEC_PROMPTS],
                    help="the prompt: explain (default), or benchmarks/speculative.py's repeat / edit / code, "
                         "where drafting has something to find")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--out", default=f"benchmarks/results/decode-cpu-{time.strftime('%Y-%m-%d-%H%M')}.md")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from nanoseek.chat import render_prompt
    from nanoseek.weights.gguf import gguf_tokenizer
    from nanoseek.weights.registry import resolve

    gguf = str(resolve(a.model)[0])
    text = PROMPT if a.prompt == "explain" else SPEC_PROMPTS[a.prompt]
    ids = render_prompt(gguf_tokenizer(gguf), [{"role": "user", "content": text}]).ids
    q = a.quant
    rows: list[Row] = []
    T = a.threads
    for b in a.batches:
        for t in sorted({1, T}) if b == 1 else [T]:
            rows.append(Row(f"nanoseek ({q}, native step, {t} thread{'s' * (t > 1)})" if b == 1 else f"nanoseek ({q})",
                            b, nanoseek_row(gguf, ids, a.new, b, q, native=b == 1, threads=t)))
        for spec in a.speculative if b == 1 else []:
            rows.append(Row(f"nanoseek ({q}, native step, {spec} drafts)", b,
                            nanoseek_row(gguf, ids, a.new, b, q, native=True, threads=T, drafter=spec)))
        if a.torch_path and b == 1:
            rows.append(Row(f"nanoseek ({q}, PyTorch path)", b,
                            nanoseek_row(gguf, ids, a.new, b, q, native=False, threads=T)))
        if a.compile:
            rows.append(Row(f"nanoseek ({q}, PyTorch path, compiled)", b,
                            nanoseek_row(gguf, ids, a.new, b, q, native=False, threads=T, compile=True)))
        if a.fp32:
            rows.append(Row("nanoseek (fp32)", b, nanoseek_row(gguf, ids, a.new, b, "none", native=False, threads=T)))
        if a.transformers:
            rows.append(Row("transformers generate (fp32)", b, transformers_row(gguf, ids, a.new, b)))
    if not a.skip_llamacpp:  # its Python bindings run one sequence at a time: batch 1 only
        for t in sorted({1, a.threads}):
            for flash in (False, True):
                rows.append(Row(f"llama.cpp (Q4_1, {t} thread{'s' * (t > 1)}, flash attn {'on' if flash else 'off'})",
                                1, llamacpp_row(gguf, ids, a.new, t, flash)))

    runs = []
    for row in rows:
        runs.append(row.setup())
        print(f"ready: {row.name}", file=sys.stderr)
    for r in range(a.repeats):
        for row, run in zip(rows, runs):
            row.results.append(run())
            print(f"repeat {r}: {row.name} batch {row.batch}: {row.results[-1]}", file=sys.stderr)

    lc = [row for row in rows if row.name.startswith("llama.cpp")]
    best = max(lc, key=lambda row: row.median("decode")) if lc else None
    lines = ["# Decode benchmark: SmolLM2-135M-Instruct (Q4_1 GGUF)\n",
             f"- machine: {cpu_name()}, {os.cpu_count()} CPUs; flags: {cpu_features()}",
             f"- torch {torch.__version__}, {a.threads} threads unless the row says otherwise",
             (f"- date: {time.strftime('%Y-%m-%d %H:%M')}; prompt {len(ids)} tokens, {a.new} new tokens, greedy, "
              f"EOS suppressed; median of {a.repeats} repeats, rows interleaved"),
             f"- command: `python benchmarks/decode.py {' '.join(sys.argv[1:])}`"]
    if best:
        lines.append(f"- ratio: decode tok/s over llama.cpp's best setting here ({best.name})")
    lines += ["", "| engine | batch | prefill tok/s | decode tok/s | decode vs llama.cpp best | decode, each repeat | note |",
              "|---|---|---|---|---|---|---|"]
    for row in rows:
        dec = row.median("decode")
        ratio = f"{dec / best.median('decode'):.2f}x" if best and row.batch == 1 else ""
        each = " ".join(f"{m.decode:.0f}" for m in row.results)
        note = row.results[-1].note if row.results else ""
        lines.append(f"| {row.name} | {row.batch} | {row.median('prefill'):.0f} | {dec:.1f} | {ratio} | {each} | {note} |")
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
