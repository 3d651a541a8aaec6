"""GGUF export proof against llama.cpp: three models trained with nanoseek, exported with its commands, run in
llama.cpp (llama-cpp-python, the `bench` extra) and compared with nanoseek itself. One run, a few CPU minutes.

    .venv/bin/python benchmarks/gguf_export.py --text /path/to/tinyshakespeare/input.txt \\
        --chat /path/to/gsm8k/train.jsonl [--work DIR] [--out benchmarks/results/gguf-export-DATE.md]

Models (each exported by the CLI, `nanoseek export` / `nanoseek convert`, to f16 q8_0 q4_0 q4_1 q4_k_m):
1. tiny DeepSeek-V3 (configs/tiny.toml: MLA, 8 experts + 1 shared, first layer dense, MTP) pretrained for
   --pretrain-steps on --text with a tokenizer trained by `nanoseek tokenizer train` → llama.cpp `deepseek2`.
2. R1-style SFT: model 1 fine-tuned on GSM8K turned into R1 chat (<think>reasoning</think> answer) with our
   R1 chat template; checked on a prompt rendered with thinking on.
3. SmolLM2-135M (built-in) fine-tuned with LoRA (`sft --lora-r 8`, adapters merged) → llama.cpp `llama`;
   its 576-wide rows do not fill Q4_K's 256-blocks, so q4_k_m falls back per tensor.

Per model and quant: file size, export time, per-tensor fallbacks, whether llama.cpp tokenizes a probe text
(digits, spaces, newlines, unicode) to the same ids and detokenizes it to the same text, prompt logits
against nanoseek's fp32 source model (relative RMS ‖Δ‖/‖logits‖ and max |Δ| / max |logit|), and how many of
32 greedy tokens llama.cpp continues exactly as nanoseek (and whether the texts are equal).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_name  # benchmarks/machine.py: scripts import their neighbours

REPO = Path(__file__).resolve().parents[1]
QUANTS = ["f16", "q8_0", "q4_0", "q4_1", "q4_k_m"]
BUILD_FLAGS = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON '
               '-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF '
               '-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install llama-cpp-python==0.3.36')


def nanoseek(*args: str) -> float:
    """Run a nanoseek command in a child process (as a user would); returns its wall time."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "nanoseek.cli", *args], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    if r.returncode:
        sys.exit(f"nanoseek {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    print(r.stdout.strip()[-600:], flush=True)
    return time.perf_counter() - t0


def r1_chat(src: Path, dst: Path, n: int) -> None:
    """GSM8K rows as R1 conversations: the worked solution as reasoning, the number as the answer."""
    with open(src) as f, open(dst, "w") as out:
        for line in list(f)[:n]:
            row = json.loads(line)
            reasoning, _, final = row["answer"].partition("####")
            reply = f"<think>\n{reasoning.strip()}\n</think>\n\nThe answer is {final.strip()}."
            out.write(json.dumps({"messages": [{"role": "user", "content": row["question"]},
                                               {"role": "assistant", "content": reply}]}) + "\n")


_SIDE: dict = {}


def _nanoseek_side(model, ids: tuple[int, ...]) -> tuple[torch.Tensor, list[int]]:
    """nanoseek's prompt logits and 32 greedy tokens, once per model and prompt (every quant compares to them)."""
    key = (id(model), ids)
    if key not in _SIDE:
        with torch.no_grad():
            ref = model(torch.tensor([ids]))[0].float()
            ours, seq = [], list(ids)
            for _ in range(32):
                ours.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
                seq.append(ours[-1])
        _SIDE[key] = (ref, ours)
    return _SIDE[key]


def compare(path: Path, model, tok, prompt: str, n_threads: int) -> dict:
    """llama.cpp on `path` against nanoseek's `model` (fp32) on one prompt (text with special tokens)."""
    import llama_cpp

    from nanoseek.weights.gguf_export import PROBE_TEXT

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=n_threads, logits_all=True, verbose=False)
    probe_ids = tok.encode(PROBE_TEXT, add_special_tokens=False)
    theirs_probe = llm.tokenize(PROBE_TEXT.encode(), add_bos=False, special=False)
    ids = tok.encode(prompt, add_special_tokens=False)
    theirs_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    got = torch.from_numpy(np.asarray(llm.scores[:len(ids)]).copy())
    ref, ours = _nanoseek_side(model, tuple(ids))
    theirs = []
    for _ in range(32):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), 32)
    return {
        "probe_ids": theirs_probe == probe_ids,
        "probe_text": llm.detokenize(probe_ids).decode("utf-8", "replace") == tok.decode(probe_ids),
        "prompt_ids": theirs_ids == ids,
        "rms": float((got - ref).norm() / ref.norm()),
        "max": float((got - ref).abs().max() / ref.abs().max()),
        "greedy": same,
        "text": llm.detokenize(theirs, special=True).decode("utf-8", "replace") == tok.decode(ours),
        "sample": tok.decode(ours)[:60],
    }


def export_all(kind: str, src: Path, work: Path, stem: str, model, tok, prompt: str, threads: int) -> list[dict]:
    from nanoseek.weights.gguf import GGUFFile

    rows = []
    (work / stem).mkdir(exist_ok=True)   # one folder per model: its Modelfile sits beside its files
    for q in QUANTS:
        out = work / stem / f"{stem}-{q}.gguf"
        extra = ["--ollama"] if q == "f16" else []
        cmd = ["export", str(src), str(out), "--format", "gguf"] if kind == "run" else ["convert", str(src), str(out)]
        secs = nanoseek(*cmd, "--quant", q, *extra)
        with GGUFFile(out) as g:
            arch = g.architecture
            n_types = {}
            for t in g.tensors.values():
                n_types[t.qtype.name] = n_types.get(t.qtype.name, 0) + 1
        row = {"model": stem, "arch": arch, "quant": q, "mib": out.stat().st_size / 2**20, "export_s": secs,
               "types": n_types, **compare(out, model, tok, prompt, threads)}
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", required=True, help="plain text for the tokenizer and pretraining")
    ap.add_argument("--chat", required=True, help="GSM8K train.jsonl (question, answer with '#### n')")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--lora-steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import tempfile

    import llama_cpp

    from nanoseek.train.checkpoint import load_model as load_checkpoint
    from nanoseek.train.tokenizer import load_tokenizer
    from nanoseek.weights.registry import load_model

    torch.set_num_threads(a.threads)
    work = Path(a.work or tempfile.mkdtemp(prefix="gguf-export-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[dict] = []
    timings = {}

    # 1. tiny DeepSeek-V3, pretrained
    timings["tokenizer train"] = nanoseek("tokenizer", "train", a.text, "--vocab-size", "512", "--out",
                                          str(work / "tok"), "--doc-split", "blank-lines")
    timings["data prepare"] = nanoseek("data", "prepare", a.text, "--tokenizer", str(work / "tok"), "--out",
                                       str(work / "data"), "--doc-split", "blank-lines", "--val-fraction", "0.05")
    timings[f"pretrain ({a.pretrain_steps} steps)"] = nanoseek(
        "pretrain", "--config", "configs/tiny.toml", "--set", f"data.path={work / 'data'}", "--set",
        f"train.steps={a.pretrain_steps}", "--set", f"train.out_dir={work / 'tiny'}", "--set", "train.eval_every=0",
        "--set", f"train.ckpt_every={a.pretrain_steps}")
    tiny, _, meta = load_checkpoint(work / "tiny")
    tok = load_tokenizer(meta["tokenizer"])
    prompt = tok.bos_token + "ROMEO:\nBut soft, what light"
    rows += export_all("run", work / "tiny", work, "tiny-deepseek-v3", tiny, tok, prompt, a.threads)

    # 2. R1-style SFT of the tiny model
    nanoseek("export", str(work / "tiny"), str(work / "tiny-hf"))
    r1_chat(Path(a.chat), work / "r1.jsonl", 400)
    timings[f"sft R1 ({a.sft_steps} steps)"] = nanoseek(
        "sft", "--model", str(work / "tiny-hf"), "--data", str(work / "r1.jsonl"), "--out", str(work / "r1"),
        "--steps", str(a.sft_steps), "--lr", "1e-3", "--seq-len", "512", "--batch-size", "4", "--no-plots")
    r1 = load_model(work / "r1" / "final")
    conv = [{"role": "user", "content": "Tom has 3 apples and buys 5 more. How many apples does he have?"}]
    prompt = r1.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, thinking=True)
    rows += export_all("hf", work / "r1" / "final", work, "r1-sft-tiny", r1.model, r1.tokenizer, prompt, a.threads)

    # 3. SmolLM2-135M + LoRA, merged
    timings[f"sft LoRA SmolLM2 ({a.lora_steps} steps)"] = nanoseek(
        "sft", "--model", "smollm2-135m", "--data", str(work / "r1.jsonl"), "--out", str(work / "smol"),
        "--lora-r", "8", "--steps", str(a.lora_steps), "--seq-len", "256", "--batch-size", "2", "--no-plots")
    smol = load_model(work / "smol" / "final")
    conv = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = smol.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    rows += export_all("hf", work / "smol" / "final", work, "smollm2-135m-lora", smol.model, smol.tokenizer, prompt,
                       a.threads)

    total = time.perf_counter() - started
    date = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = Path(a.out or REPO / "benchmarks" / "results" / f"gguf-export-{date}.md")
    lines = [f"# GGUF export against llama.cpp, {date}", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {a.threads} threads "
             f"(nanoseek and llama.cpp).",
             f"llama-cpp-python {llama_cpp.__version__}, built with {BUILD_FLAGS} (the default build segfaults in "
             f"decode on this host's AMX path).",
             f"llama.cpp system info: `{llama_cpp.llama_print_system_info().decode().strip()}`", "",
             f"Command: `python benchmarks/gguf_export.py --text TEXT --chat GSM8K --pretrain-steps "
             f"{a.pretrain_steps} --sft-steps {a.sft_steps} --lora-steps {a.lora_steps}` ({total:.0f} s in all).",
             "Training steps: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".", "",
             "Logits: the prompt's logits from llama.cpp against nanoseek's fp32 model (the source, not the file): "
             "relative RMS ‖Δ‖/‖logits‖ and max |Δ|/max |logit|. Greedy: leading tokens of 32 that llama.cpp "
             "continues exactly as nanoseek; text: the 32 tokens decoded by each are equal. Probe: llama.cpp "
             "tokenizes digits/spaces/newlines/unicode text to our ids and detokenizes it to our text.", "",
             "| model | arch | quant | MiB | export s | tensor types | probe ids / text | prompt ids | logits RMS | "
             "logits max | greedy /32 | text |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        types = " ".join(f"{k}:{v}" for k, v in sorted(r["types"].items()))
        lines.append(f"| {r['model']} | {r['arch']} | {r['quant']} | {r['mib']:.1f} | {r['export_s']:.1f} | {types} | "
                     f"{'yes' if r['probe_ids'] else 'NO'} / {'yes' if r['probe_text'] else 'NO'} | "
                     f"{'yes' if r['prompt_ids'] else 'NO'} | {r['rms']:.4f} | {r['max']:.4f} | {r['greedy']} | "
                     f"{'same' if r['text'] else 'differs'} |")
    lines += ["", "Greedy samples (nanoseek, f16 rows):", ""]
    lines += [f"- {r['model']}: {r['sample']!r}" for r in rows if r["quant"] == "f16"]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
