"""Speculative decoding on CPU: plain decoding against each drafter, same model, same prompts, one run.

    .venv/bin/python benchmarks/speculative.py [--model smollm2-135m] [--quant auto] [--new 256] [--repeats 2]
        [--draft-model NAME] [--mtp-model DIR --mtp-data DATA_DIR] [--sets ...] [--threads 2] [--out FILE]

Prompt sets (batch 1, greedy, the chat template of the model):
  * repeat: "repeat this passage exactly" with a ~300-token passage;
  * edit:   the same passage with a light edit asked for (one name replaced throughout);
  * code:   a Python function with a rename asked for.
With --mtp-model (a DeepSeek-V3-style checkpoint with an MTP module, e.g. the tiny preset trained on
tinyshakespeare) the MTP drafter is measured on prompts from the held-out split of --mtp-data (a `nanoseek data
prepare` directory made with the model's tokenizer): plain continuation, no template.

Columns: decode tok/s (tokens after the first / their wall time, median of --repeats), speed-up over plain
decoding of the same prompts, acceptance rate (accepted / proposed drafts), tokens per verify step, and
agreement: the share of prompts whose greedy output equals plain decoding's token for token (with int4
weights a verify step's numerics may differ from a one-token step's, so this can fall below 100%).
`speculative_rows` is importable, so benchmarks/decode.py can add these rows to its table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_name  # benchmarks/machine.py

PASSAGE = (
    "The lighthouse keeper on Marrow Point kept three notebooks. The first held the weather: wind from the "
    "north-west at dawn, a falling glass by noon, fog that came in low over the shingle and lifted again by "
    "evening. The second held the ships, each one named if he could read it through the glass, and described "
    "if he could not: a grey coaster riding high and empty, a trawler with a red wheelhouse, a yacht under "
    "reefed sails beating hard against the tide. The third notebook held nothing that anyone else would have "
    "called important. In it he wrote down the birds that rested on the gallery rail, the colour of the sea "
    "at four in the afternoon, and the names of the children who walked out along the causeway on Sundays to "
    "ask whether the lamp was really as bright as a thousand candles. It was brighter, he told them, and "
    "showed them the lens, which was taller than any of them and made their faces into small bright moons. "
    "When the keeper retired, the board sent a man to collect the notebooks. He took the first two back to "
    "the office in the town, where they were filed, and left the third on the kitchen table, because no "
    "column in any ledger had a place for it. The new keeper found it there in the spring, read it through "
    "in one evening, and the next morning began to write in it himself.")

CODE = '''def moving_average(values, window):
    """Average of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    total = 0.0
    out = []
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out


def normalise(values):
    """Scale values to the range 0..1."""
    low, high = min(values), max(values)
    if high == low:
        return [0.0 for _ in values]
    return [(value - low) / (high - low) for value in values]
'''

PROMPTS = {
    "repeat": f"Repeat the following passage exactly, word for word, and write nothing else.\n\n{PASSAGE}",
    "edit": f"Repeat the following passage exactly, but call the place Gannet Head instead of Marrow Point. "
            f"Write nothing else.\n\n{PASSAGE}",
    "code": f"Rename the variable `total` to `running_sum` in this code. Reply with the whole code only.\n\n{CODE}",
}


def _once(engine, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    """Decode tok/s over the prompts, each alone, and the outputs."""
    from nanoseek.engine.sampling import SamplingParams

    p = SamplingParams(temperature=0, max_tokens=new)
    toks = secs = 0.0
    outs = []
    for ids in prompts:
        t0 = time.perf_counter()
        o = engine.generate([ids], p)[0]
        total = time.perf_counter() - t0
        toks += len(o.token_ids) - 1
        secs += total - o.first_token_s
        outs.append(o.token_ids)
    return toks / secs, outs


def speculative_rows(model, tokenizer, prompts: list[list[int]], drafters: dict, new: int, repeats: int,
                     k: int = 6) -> list[dict]:
    """Plain decoding and each drafter (name -> Drafter) on the same model and prompts. Repeats interleave
    the variants, so a machine whose load drifts affects them alike; each figure is a median."""
    from nanoseek.engine.generate import Engine

    engines = {"none": Engine(model, tokenizer)}
    engines.update({name: Engine(model, tokenizer, drafter=d, draft_tokens=k) for name, d in drafters.items()})
    rates = {name: [] for name in engines}
    outs = {}
    for _ in range(repeats):
        for name, eng in engines.items():
            r, outs[name] = _once(eng, prompts, new)
            rates[name].append(r)
    base, want = statistics.median(rates["none"]), outs["none"]
    rows = []
    for name, eng in engines.items():
        st = eng.loop.stats()
        rate = statistics.median(rates[name])
        rows.append({"drafter": name, "tok_s": rate, "speedup": rate / base,
                     "acceptance": st["spec_acceptance_rate"], "per_step": st["spec_tokens_per_step"],
                     "agreement": sum(a == b for a, b in zip(outs[name], want)) / len(want)})
    return rows


def _table(title: str, rows: list[dict]) -> list[str]:
    def pct(x):
        return "–" if x is None else f"{x:.0%}"

    lines = [f"### {title}", "", "| drafter | decode tok/s | speed-up | acceptance | tokens/verify step | agreement |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        per = "–" if r["per_step"] is None else f"{r['per_step']:.2f}"
        lines.append(f"| {r['drafter']} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | {pct(r['acceptance'])} | {per} | "
                     f"{pct(r['agreement'])} |")
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quant", default="auto")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--draft-tokens", type=int, default=6)
    ap.add_argument("--draft-model", default=None, help="a draft model for draft=MODEL rows (same tokenizer)")
    ap.add_argument("--mtp-model", default=None, help="a checkpoint with an MTP module (e.g. tiny preset, exported)")
    ap.add_argument("--mtp-data", default=None, help="a `nanoseek data prepare` directory: prompts come from its "
                                                     "held-out (val) split")
    ap.add_argument("--mtp-prompts", type=int, default=8)
    ap.add_argument("--sets", nargs="*", default=list(PROMPTS), choices=list(PROMPTS),
                    help="which built-in prompt sets to run (none: only the MTP rows)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from nanoseek.chat import render_prompt
    from nanoseek.engine.draft import ModelDrafter, MTPDrafter, NgramDrafter
    from nanoseek.session import LoadOptions, Session

    lines = [f"# Speculative decoding, CPU, {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"Machine: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads. "
             f"Greedy, batch 1, up to {a.new} new tokens, draft tokens {a.draft_tokens}, median of {a.repeats}.",
             f"Command: `{' '.join(sys.argv)}`", ""]
    s = Session(LoadOptions(model=a.model, quant=a.quant, threads=a.threads)) if a.sets else None
    drafters = {"ngram": NgramDrafter()}
    if a.draft_model and s is not None:
        d = Session(LoadOptions(model=a.draft_model, quant=a.quant)).model
        drafters[f"draft={a.draft_model}"] = ModelDrafter(d, s.engine.vocab_size, s.engine.context)
    for name in a.sets:
        text = PROMPTS[name]
        ids = render_prompt(s.tokenizer, [{"role": "user", "content": text}]).ids
        rows = speculative_rows(s.model, s.tokenizer, [ids], drafters, a.new, a.repeats, a.draft_tokens)
        lines += _table(f"{a.model} ({s.quant} weights): {name} ({len(ids)} prompt tokens)", rows)
        print("\n".join(lines[-len(rows) - 4:]), flush=True)
    if a.mtp_model:
        m = Session(LoadOptions(model=a.mtp_model, quant="none"))
        meta = json.loads((Path(a.mtp_data) / "meta.json").read_text())
        ids = np.concatenate([np.fromfile(Path(a.mtp_data) / f["file"], dtype=meta["dtype"])
                              for f in meta["splits"]["val"]]).astype(np.int64).tolist()
        step = max(1, len(ids) // a.mtp_prompts)
        prompts = [ids[i * step:i * step + 64] for i in range(a.mtp_prompts)]
        rows = speculative_rows(m.model, m.tokenizer, prompts,
                                {"mtp": MTPDrafter(m.model, m.engine.context), "ngram": NgramDrafter()},
                                min(a.new, 128), a.repeats, a.draft_tokens)
        lines += _table(f"{a.mtp_model} (MTP module, fp32): {a.mtp_prompts} held-out prompts of 64 tokens", rows)
        print("\n".join(lines[-len(rows) - 4:]), flush=True)
    out = Path(a.out or f"benchmarks/results/speculative-cpu-{time.strftime('%Y-%m-%d-%H%M')}.md")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
