"""The R1 pipeline end to end on a CPU budget: `nanoseek recipe r1` at its cpu preset, timed, with the report
card copied to benchmarks/results/ (the machine named). There is one pipeline: this script only runs the
command and files its output (the recipe is nanoseek/train/recipe.py).

The recipe: worked solutions of the task's train problems as cold-start SFT data (R1 §2.3.1: without it
SmolLM2-135M never writes the format, every GRPO group has one reward, and nothing is learned), SFT, then
GRPO, with the same eval on the same held-out problems before and after each stage.

    python benchmarks/r1_cpu.py [--model smollm2-135m] [--out runs/r1-bench] [-- extra recipe flags]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py: scripts import their neighbours


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--out", default=None, help="recipe directory (default: a fresh runs/r1-bench-DATE)")
    ap.add_argument("extra", nargs="*", help="more `nanoseek recipe r1` flags (after --)")
    a = ap.parse_args()
    stamp = time.strftime("%Y-%m-%d-%H%M")
    out = Path(a.out or f"runs/r1-bench-{stamp}")
    cmd = [sys.executable, "-m", "nanoseek.cli", "recipe", "r1", "--model", a.model, "--task", a.task,
           "--out", str(out), "--device", "cpu", *a.extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    load = os.getloadavg()   # the machine may be shared: say how busy it was
    dest = Path("benchmarks/results") / f"r1-cpu-{stamp}"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "stages.png", "grpo.png"):
        if (out / name).is_file():
            shutil.copy(out / name, dest / name)
    with (dest / "report.md").open("a") as f:
        f.write(f"\n- command: `nanoseek recipe r1 --model {a.model} --task {a.task} --device cpu "
                f"{' '.join(a.extra)}` (via benchmarks/r1_cpu.py)\n- wall time, all stages: {wall / 60:.1f} min "
                f"on {cpu_name()} ({os.cpu_count()} CPUs; load average at the end {load[0]:.1f} / {load[1]:.1f} / "
                f"{load[2]:.1f} over 1 / 5 / 15 min)\n")
    print(f"wrote {dest}/report.md ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
