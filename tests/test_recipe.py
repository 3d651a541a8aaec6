"""`nanoseek recipe r1` at a tiny size: cold-start SFT → GRPO with the same eval before and after each stage,
a report card at the end, and a run killed with SIGKILL in the middle of GRPO continues where it stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_newcomer_errors import tiny_model_dir

from nanoseek.cli import main
from nanoseek.tasks import get_task
from nanoseek.train.loop import read_jsonl
from nanoseek.train.recipe import worked_reasoning, write_cold_start

REPO = Path(__file__).resolve().parents[1]
TINY = ["--sft-steps", "2", "--grpo-steps", "6", "--eval-problems", "3", "--device", "cpu",
        "--task-arg", "digits=1", "--task-arg", "ops=+"]
# The stage sizes the CLI has no flag for, at test scale (the recipe's own override mechanism).
SIZES = [x for kv in ("cold_start.conversations=8", "cold_start.seq_len=400", "cold_start.batch_size=2",
                      "rl.ckpt_every=1", "rl.grpo.group_size=2", "rl.grpo.prompts_per_step=2",
                      "rl.grpo.max_new_tokens=4", "eval.protocol.samples=1", "eval.protocol.max_tokens=4",
                      'eval.quant="none"') for x in ("--set", kv)]


def test_cold_start_data_is_the_task_in_the_format(tmp_path):
    task = get_task("arithmetic", digits=1, ops="+")
    rows = [json.loads(x) for x in write_cold_start(task, tmp_path / "c.jsonl", 3).read_text().splitlines()]
    p = task.problems("train", 1)[0]
    reply = rows[0]["messages"][-1]
    assert reply == {"role": "assistant", "reasoning_content": worked_reasoning(task, p),
                     "content": f"<answer>{p.answer}</answer>"}
    assert reply["reasoning_content"].endswith(f"= {p.answer}") and len(rows) == 3


def test_recipe_report_card_and_resume_after_kill(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "tiny", hidden=32)
    out = tmp_path / "r1"
    argv = ["recipe", "r1", "--model", str(model), "--task", "arithmetic", "--out", str(out), *TINY, *SIZES]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first_ckpt = out / "grpo" / "checkpoints" / "step_00000001"
    deadline = time.monotonic() + 120
    while not first_ckpt.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first_ckpt.is_dir() and not (out / "grpo.done").exists(), proc.stderr.read()[-2000:]
    base_eval = (out / "eval" / "base.json").stat().st_mtime_ns

    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "grpo" in err and "cold-start SFT" not in err   # only GRPO continued
    assert (out / "eval" / "base.json").stat().st_mtime_ns == base_eval
    steps = [r["step"] for r in read_jsonl(out / "grpo" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 7))          # one run, each step once
    card = (out / "report.md").read_text()
    for stage in ("base model", "after cold-start SFT", "after GRPO"):
        assert f"| {stage} |" in card
    assert "strict pass@1" in card and "(stages.png)" in card and "(grpo.png)" in card
    assert (out / "stages.png").stat().st_size > 0 and (out / "grpo.png").stat().st_size > 0
    for key in ("reward", "accuracy", "format", "kl", "completion_len"):
        assert key in card.split("GRPO per step")[1]
    # Another setting under the same directory is refused, not mixed in.
    assert main([*argv, "--sft-steps", "3", "--no-plots"]) == 3   # plots may change; steps may not
    assert "other settings (cold_start)" in capsys.readouterr().err
