"""Structured output: validity over many JSON schemas, and what the grammar constraint costs per decode step.

    python benchmarks/structured.py [--model smollm2-135m] [--schemas 60] [--max-tokens 96] [--new 64]
        [--out benchmarks/results/structured-cpu-DATE.md]

1. Validity: --schemas generated schemas (seeded: objects, nesting, arrays, enums, anyOf, $ref, numeric
   bounds, string lengths, escapes), one prompt each, decoded in one batched pass (batch 16) under their
   grammar. Every output that ends with `stop` is checked with jsonschema-rs (not the grammar engine);
   `length` cuts and grammar dead ends are counted.
2. Speed: tok/s at batch 1 and 16, free vs constrained (an open-ended JSON array of integers, so both
   decode --new tokens: the constrained rows cannot end earlier, the free rows ignore EOS), and the share
   of the decode step spent computing masks (time inside Constraint.allowed / wall time).

Writes a dated markdown table with the CPU model name (`lscpu`'s "Model name").
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402


def make_schema(rng: random.Random, depth: int = 0) -> dict:
    """One random schema of the kinds the openai SDK and agent frameworks send."""
    kinds = ["string", "integer", "number", "boolean", "enum", "array", "anyOf"] + (["object"] * 2 if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        s = {"type": "string"}
        if rng.random() < 0.5:
            s["maxLength"] = rng.randint(3, 20)
        if rng.random() < 0.3:
            s["minLength"] = 1
        return s
    if kind == "integer":
        lo = rng.randint(-10, 10)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(1, 1000)}
    if kind == "number":
        return {"type": "number", "minimum": 0}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 'say "hi"', "back\\slash", "naïve", "tab\t"], 3)}
    if kind == "array":
        return {"type": "array", "items": make_schema(rng, depth + 1), "maxItems": rng.randint(1, 4)}
    if kind == "anyOf":
        return {"anyOf": [make_schema(rng, depth + 1), make_schema(rng, depth + 1)]}
    names = rng.sample(["name", "age", "city", "tags", "score", "ok", "items", "note", "id", "kind"], rng.randint(1, 4))
    props = {n: make_schema(rng, depth + 1) for n in names}
    return {"type": "object", "properties": props, "required": names, "additionalProperties": False}


def schemas(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = make_schema(rng)
        if i % 5 == 0:   # every fifth through $defs/$ref, as pydantic writes nested models
            s = {"$defs": {"Item": s}, "type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}},
                 "required": ["item"], "additionalProperties": False}
        out.append(s)
    return out


class Timed:
    """A constraint whose allowed() time is added up."""

    def __init__(self, inner, clock: list[float]):
        self.inner, self.clock = inner, clock

    def allowed(self):
        t = time.perf_counter()
        m = self.inner.allowed()
        self.clock[0] += time.perf_counter() - t
        return m

    def advance(self, token):
        t = time.perf_counter()
        self.inner.advance(token)
        self.clock[0] += time.perf_counter() - t

    def rollback(self, n):
        self.inner.rollback(n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--schemas", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import jsonschema_rs

    from nanoseek.chat import render_prompt
    from nanoseek.engine.generate import Engine
    from nanoseek.engine.grammar import Grammar, GrammarCompiler, json_schema
    from nanoseek.engine.sampling import SamplingParams
    from nanoseek.weights.registry import load_model

    loaded = load_model(a.model)
    tok = loaded.tokenizer
    eng = Engine(loaded.model, tok, max_batch=16)
    t = time.perf_counter()
    comp = GrammarCompiler(tok, eng.vocab_size, eng.eos_token_ids)
    setup_s = time.perf_counter() - t
    rows: list[tuple[str, str]] = [("tokenizer wrap for llguidance (once per model)", f"{setup_s:.2f} s")]

    # 1. validity
    sch = schemas(a.schemas)
    prompts, cons = [], []
    for s in sch:
        comp.check(json_schema(s), s)
        prompts.append(render_prompt(tok, [{"role": "user", "content": "Reply with JSON matching this schema: "
                                            + json.dumps(s)}]).ids)
        cons.append(comp.constraint(Grammar(json_schema(s))))
    t = time.perf_counter()
    outs = eng.generate(prompts, [SamplingParams(temperature=0.7, seed=i, max_tokens=a.max_tokens)
                                  for i in range(len(sch))], constraints=cons)
    valid_s = time.perf_counter() - t
    stop = [(s, o) for s, o in zip(sch, outs) if o.finish_reason == "stop"]
    ok = sum(jsonschema_rs.is_valid(s, json.loads(o.text)) for s, o in stop)
    cuts = sum(o.finish_reason == "length" for o in outs)
    errors = sum(o.finish_reason == "error" for o in outs)
    rows += [(f"schemas (batch 16, max_tokens {a.max_tokens})", str(len(sch))),
             ("finished with stop", str(len(stop))), ("valid among stop (jsonschema-rs)", f"{ok}/{len(stop)}"),
             ("length cuts", str(cuts)), ("grammar dead ends", str(errors)),
             ("validity pass wall time", f"{valid_s:.1f} s")]

    # 2. speed
    free_prompt = render_prompt(tok, [{"role": "user", "content": "List many numbers."}]).ids
    grammar = Grammar(json_schema({"type": "array", "items": {"type": "integer"}}))
    for batch in (1, 16):
        res = {}
        for mode in ("free", "constrained"):
            clock = [0.0]
            cs = ([Timed(comp.constraint(grammar), clock) for _ in range(batch)] if mode == "constrained"
                  else None)
            p = SamplingParams(temperature=0.8, seed=1, max_tokens=a.new, ignore_eos=mode == "free")
            eng.generate([free_prompt] * batch, p, constraints=cs)   # warm-up (and prefill) once
            cs = ([Timed(comp.constraint(grammar), clock) for _ in range(batch)] if mode == "constrained"
                  else None)
            clock[0] = 0.0
            t = time.perf_counter()
            outs = eng.generate([free_prompt] * batch, p, constraints=cs)
            wall = time.perf_counter() - t
            n = sum(len(o.token_ids) for o in outs)
            res[mode] = (n / wall, clock[0] / wall, sum(o.finish_reason == "length" for o in outs))
        free, con = res["free"], res["constrained"]
        rows += [(f"batch {batch}: tok/s free", f"{free[0]:.1f}"),
                 (f"batch {batch}: tok/s constrained", f"{con[0]:.1f} ({con[0] / free[0] - 1:+.1%})"),
                 (f"batch {batch}: mask time / wall time", f"{con[1]:.1%}")]

    date = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = Path(a.out or Path(__file__).resolve().parent / "results" / f"structured-cpu-{date}.md")
    cmd = "python benchmarks/structured.py " + " ".join(sys.argv[1:])
    lines = [f"# Structured output ({date})", "", f"- command: `{cmd}`", f"- CPU: {cpu_name()}",
             f"- torch threads: {torch.get_num_threads()}", f"- model: {a.model}", "",
             "| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
