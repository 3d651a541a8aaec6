"""The R1 pipeline end to end on a CPU budget: cold-start SFT, then GRPO, evaluated the same way at each stage.

DeepSeek-R1 (§2.3.1) starts RL from a "cold start": a little supervised data in the target format, so the
policy produces rewardable outputs at all. SmolLM2-135M never writes `<think>…</think><answer>…</answer>` on
its own (every GRPO group then has zero reward variance: nothing to learn), so this script:

  1. writes synthetic cold-start conversations for the task's *train* problems: the format, with the
     arithmetic written out as the reasoning (`53 + 44 = 97`) — data in the format, not hand-picked answers;
  2. evaluates the base model, SFTs it on that data (`nanoseek sft`), evaluates, runs `nanoseek grpo` from
     the SFT model, evaluates again — same held-out problems, same seeds, same protocol each time.

Every stage is the real CLI. Numbers are printed as they come and written to benchmarks/results/.

    python benchmarks/r1_cpu.py [--model smollm2-135m] [--problems 100] [--sft-steps 30] [--grpo-steps 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py: scripts import their neighbours

TASK = ["--task", "arithmetic", "--task-arg", "digits=2", "--task-arg", "ops=+-"]


def nanoseek(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nanoseek.cli", *args], check=True)
    return time.perf_counter() - t


def evaluate(model: str, out: Path, a) -> dict:
    # The prompt opens <think> (the default), as SFT rendered its prompts for replies with reasoning.
    nanoseek("eval", "--model", model, *TASK, "--limit", str(a.problems), "--samples", "2", "--max-tokens", "48",
             "--out", str(out))
    report = json.loads(out.read_text())
    return report


def cold_start(path: Path, n: int) -> None:
    from nanoseek.tasks import get_task
    from nanoseek.tasks.prompts import Template

    task = get_task("arithmetic", digits=2, ops="+-")
    template = Template("chat", open_think=False)
    rows = []
    for p in task.problems("train", n):
        reply = {"role": "assistant", "reasoning_content": f"{p.meta['expression']} = {p.answer}",
                 "content": f"<answer>{p.answer}</answer>"}
        rows.append(json.dumps({"messages": [*template.messages(p), reply]}))
    path.write_text("\n".join(rows) + "\n")


def summary(report: dict) -> dict:
    m, s = report["metrics"], report["stats"]
    pick = {k: m[k]["value"] for k in m if k.split("/")[1] in ("pass@1", "greedy", "maj@2")}
    return {**pick, "format_rate": s["format_rate"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--problems", type=int, default=100, help="held-out test problems per evaluation")
    ap.add_argument("--cold-start", type=int, default=400, help="synthetic SFT conversations")
    ap.add_argument("--sft-steps", type=int, default=30)
    ap.add_argument("--grpo-steps", type=int, default=8)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    stages, times = {}, {}
    with tempfile.TemporaryDirectory(prefix="nanoseek-r1-") as tmp:
        tmp = Path(tmp)
        cold_start(tmp / "cold.jsonl", a.cold_start)
        stages["base"] = summary(evaluate(a.model, tmp / "base.json", a))
        print("base:", stages["base"], flush=True)
        times["sft"] = nanoseek("sft", "--model", a.model, "--data", str(tmp / "cold.jsonl"), "--out", str(tmp / "sft"),
                                "--steps", str(a.sft_steps), "--lr", "5e-5", "--seq-len", "256", "--batch-size", "4",
                                "--warmup-steps", "3", "--no-plots", "--device", "cpu")
        stages["sft"] = summary(evaluate(str(tmp / "sft" / "final"), tmp / "sft.json", a))
        print("after SFT:", stages["sft"], flush=True)
        times["grpo"] = nanoseek("grpo", "--model", str(tmp / "sft" / "final"), *TASK, "--out", str(tmp / "grpo"),
                                 "--steps", str(a.grpo_steps), "--lr", "5e-6", "--group-size", "4",
                                 "--prompts-per-step", "4", "--max-new-tokens", "48",
                                 "--no-plots", "--device", "cpu", "--ckpt-every", "0")
        grpo_log = [json.loads(line) for line in (tmp / "grpo" / "metrics.jsonl").read_text().splitlines()]
        stages["grpo"] = summary(evaluate(str(tmp / "grpo" / "final"), tmp / "grpo.json", a))
        print("after GRPO:", stages["grpo"], flush=True)
    keys = sorted({k for s in stages.values() for k in s})
    lines = ["# R1 pipeline on CPU: cold-start SFT, then GRPO (arithmetic, 2 digits, + and -)", "",
             f"- machine: {cpu_name()}", f"- command: `python benchmarks/r1_cpu.py {' '.join(sys.argv[1:])}`",
             f"- eval: {a.problems} held-out problems, 2 samples at T=0.6/top-p 0.95 + greedy, ≤48 tokens; "
             "`strict/` = the reward's format-gated accuracy, `answer/` = lenient answer extraction",
             f"- SFT {a.sft_steps} steps on {a.cold_start} synthetic cold-start conversations: {times['sft']:.0f} s; "
             f"GRPO {a.grpo_steps} steps (4 prompts x 4): {times['grpo']:.0f} s", "",
             "| stage | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, s in stages.items():
        lines.append(f"| {name} | " + " | ".join(f"{s.get(k, float('nan')):.3f}" for k in keys) + " |")
    lines += ["", "GRPO steps (reward, accuracy, format, frac_reward_zero_std):", ""]
    lines += [f"- step {r['step']}: {r['reward']:.3f}, {r['accuracy']:.3f}, {r['format']:.3f}, "
              f"{r['frac_reward_zero_std']:.2f}" for r in grpo_log if r.get("kind") == "train"]
    out = Path(a.out or f"benchmarks/results/r1-cpu-{time.strftime('%Y-%m-%d-%H%M')}.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
