"""The R1 effect measured: GRPO's gain over cold-start SFT alone, and on-policy distillation against SFT on
teacher traces at the same student compute, with paired tests, through the one recipe.

Runs `nanoseek recipe r1 --distill` (the one pipeline; this script adds nothing to it but settings and
statistics), then compares stages on the same held-out problems with McNemar's exact test: of the problems
where two stages disagree, how many did the second get right (b) vs the first (c); under "no effect"
b ~ Bin(b + c, 1/2). Paired on the same problems and seeds, it is far more sensitive than comparing two
intervals. The distillation teacher is the recipe's GRPO model, the student a fresh copy of the base model.

    nice -n 10 python benchmarks/r1_effect.py [--out runs/r1-effect] [--precision bf16] [-- extra recipe flags]

Training runs in bf16 autocast where the CPU has AMX (~1.8x faster there), else at the recipe's default.

Writes benchmarks/results/r1-effect-DATE.md with each stage's pass@1 (95% interval), format rate and wall
time, the McNemar counts and p-value (strict accuracy), the machine and its load.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_flags, cpu_name  # benchmarks/machine.py

from nanoseek.train.report_card import read_done, read_evals

SETTINGS = ["--task", "arithmetic", "--task-arg", "digits=3", "--task-arg", "ops=+-", "--eval-problems", "300",
            "--grpo-steps", "16", "--set", "rl.grpo.prompts_per_step=8", "--set", "eval.protocol.samples=1",
            "--set", "eval.protocol.greedy=false",   # one sample per problem: 300 completions per stage on 2 cores
            "--distill"]                             # the GRPO model distilled into the base model two ways


def mcnemar(pairs: list[tuple[bool, bool]]) -> tuple[int, int, float]:
    """(b, c, two-sided exact p): b = only the second right, c = only the first right."""
    b = sum(1 for x, y in pairs if y and not x)
    c = sum(1 for x, y in pairs if x and not y)
    n, k = b + c, min(b, c)
    if n == 0:
        return b, c, 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return b, c, min(1.0, 2 * tail)


# (first, second, what is compared): McNemar's b counts problems only the second got right.
PAIRS = [("sft", "grpo", "GRPO after SFT vs SFT alone"),
         ("sft-traces", "onpolicy", "on-policy distillation vs SFT on the teacher's traces, equal student compute"),
         ("onpolicy", "grpo", "the teacher vs its on-policy student"),
         ("sft-traces", "grpo", "the teacher vs its trace-SFT student")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=None, help="the recipe directory; an earlier run's continues (and may gain "
                                                "the distillation stage)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                    help="training arithmetic (default: bf16 on a CPU with AMX, where it is ~1.8x faster; else auto)")
    ap.add_argument("extra", nargs="*", help="more `nanoseek recipe r1` flags (after --)")
    a = ap.parse_args()
    stamp = time.strftime("%Y-%m-%d-%H%M")
    out = Path(a.out or f"runs/r1-effect-{stamp}")
    precision = a.precision or ("bf16" if "amx_bf16" in cpu_flags() else "auto")
    settings = [*SETTINGS, *([] if precision == "auto" else ["--set", f"precision={precision}"]), *a.extra]
    cmd = [sys.executable, "-m", "nanoseek.cli", "recipe", "r1", "--model", a.model, "--out", str(out),
           "--device", "cpu", "--no-plots", *settings]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    ev, done = read_evals(out), read_done(out)   # what the recipe's report card reads
    rows = ["| stage | strict pass@1 (95% CI) | answer pass@1 (95% CI) | format rate | train wall s | "
            "student tokens trained | eval s |", "|---|---|---|---|---|---|---|"]

    def pct(m):
        return f"{100 * m['value']:.1f}% [{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}]"

    for s, e in ev.items():
        m, d = e["metrics"], done.get(s, {})
        tokens = f"{d['student_tokens']:,}" if "student_tokens" in d else "-"
        rows.append(f"| {s} | {pct(m['strict/pass@1'])} | {pct(m['answer/pass@1'])} | "
                    f"{e['stats']['format_rate']:.3f} | {d.get('seconds', '-')} | {tokens} | "
                    f"{e['stats']['generate_s']:.0f} |")
    tests = []
    for first, second, what in PAIRS:
        if first in ev and second in ev:
            x = {p["id"]: p for p in ev[first]["problems"]}
            y = {p["id"]: p for p in ev[second]["problems"]}
            ids = [i for i in x if i in y]
            # One sample per problem at T = 0.6, the same seed at every stage: paired per problem.
            b, c, pval = mcnemar([(x[i]["strict_correct"] > 0, y[i]["strict_correct"] > 0) for i in ids])
            tests.append(f"| {what} | {len(ids)} | {b} | {c} | {pval:.3g} |")
    traces = done.get("traces")
    dest = Path("benchmarks/results") / f"r1-effect-{stamp}.md"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join([
        f"# The R1 effect on CPU: GRPO after cold-start SFT, and distillation of its result ({stamp})", "",
        f"- command: `nice -n 10 python benchmarks/r1_effect.py` = `nanoseek recipe r1 --model {a.model} "
        f"{' '.join(settings)}`",
        f"- machine: {cpu_name()}, {os.cpu_count()} CPUs, shared: load average {load0[0]:.1f} at the start, "
        f"{load1[0]:.1f} / {load1[1]:.1f} / {load1[2]:.1f} (1 / 5 / 15 min) at the end; this invocation "
        f"{wall / 60:.1f} min wall (stages done by an earlier one in {out} are read back, not rerun)",
        f"- {len(next(iter(ev.values()))['problems'])} held-out problems, the same at every stage; one sample per "
        "problem at T = 0.6, the same seed at every stage",
        *([f"- teacher traces (grpo model, train problems): {traces['kept']} correct replies kept of "
           f"{traces['completions']}, {traces['seconds']:.0f} s (teacher compute, not the student's)"]
          if traces else []), "",
        *rows, "",
        "McNemar's exact test on strict accuracy, paired per problem (b: right only in the second, c: right only "
        "in the first):", "",
        "| comparison | problems | b | c | two-sided p |", "|---|---|---|---|---|", *tests,
        ""]))
    print(dest.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
