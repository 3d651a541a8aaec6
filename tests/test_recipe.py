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


def test_recipe_report_card_and_resume_after_kill(tmp_path, capsys, monkeypatch):
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

    # The distillation stage extends the finished recipe without redoing it. A tiny random teacher answers no
    # problem correctly, so there are no traces: one line says so.
    dist = [x for kv in ("distill.steps=2", "distill.prompts_per_step=2", "distill.max_new_tokens=4",
                         "distill.sft_rows=2", "distill.seq_len=400", "distill.ckpt_every=1", "distill.trace_problems=3")
            for x in ("--set", kv)]
    assert main([*argv, "--distill", *dist]) == 3
    err = capsys.readouterr().err
    assert "answered none of 6 train problems" in err and "cold-start SFT" not in err and "GRPO:" not in err
    # With traces standing in for a capable teacher's (worked solutions), both arms train and are evaluated.
    from nanoseek.train import recipe

    def traces(teacher, task, d, ev, path, **kw):
        assert teacher == str(out / "grpo" / "final")
        write_cold_start(task, path, 6)
        return {"problems": 3, "completions": 6, "kept": 6, "problems_covered": 3, "duplicates": 0}

    monkeypatch.setattr(recipe, "write_teacher_traces", traces)
    assert main([*argv, "--distill", *dist]) == 0
    err = capsys.readouterr().err
    assert "cold-start SFT" not in err and "eval base" not in err
    assert (out / "eval" / "base.json").stat().st_mtime_ns == base_eval
    card = (out / "report.md").read_text()
    assert "| student: SFT on teacher traces |" in card and "| student: on-policy distillation |" in card
    assert "teacher traces: 6 correct" in card
    onpolicy = [r for r in read_jsonl(out / "onpolicy" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in onpolicy] == [1, 2] and all(r["kl"] > -1e-6 and r["batch_tokens"] > 0 for r in onpolicy)
    assert [r["lr"] for r in onpolicy] == [r["lr"] for r in read_jsonl(out / "sft-traces" / "metrics.jsonl")
                                           if r["kind"] == "train"]   # the same optimizer settings, both arms
    for arm in ("sft-traces", "onpolicy"):
        assert json.loads((out / f"{arm}.done").read_text())["student_tokens"] > 0
    assert json.loads((out / "recipe.json").read_text())["distill"]["enabled"] is True
    # Once it has run, its settings are part of the experiment.
    assert main([*argv, "--distill", *dist, "--set", "distill.lr=1e-3"]) == 3
    assert "other settings (distill)" in capsys.readouterr().err


def test_recipe_precision_reaches_every_training_stage(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "tiny", hidden=32)
    out = tmp_path / "r1"
    argv = ["recipe", "r1", "--model", str(model), "--task", "arithmetic", "--out", str(out), "--no-plots",
            *TINY, *SIZES]
    assert main([*argv, "--set", 'precision="bf16"']) == 0
    for stage in ("sft", "grpo"):
        assert json.loads((out / stage / "config.json").read_text())["train"]["precision"] == "bf16"
    assert "training precision bf16" in (out / "report.md").read_text()
    # A run from before the setting existed ran at its default: it continues without it, not with another.
    state = json.loads((out / "recipe.json").read_text())
    del state["precision"]
    (out / "recipe.json").write_text(json.dumps(state))
    assert main(argv) == 0
    assert main([*argv, "--set", 'precision="bf16"']) == 3
    assert "other settings (precision)" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "other"), "--set", 'precision="fp16"']) == 3
    assert "precision 'fp16': auto, fp32 or bf16" in capsys.readouterr().err
