"""On-policy distillation step throughput: nanoseek vs TRL's DistillationTrainer (transformers generate, no
vLLM), in one run.

The same student and teacher weights, prompts (the recipe's chat prompt, passed to TRL as the rendered text so
both see the same tokens), student completions per step, completion length, sampling (temperature 1, no top-p
or top-k), loss (per-token reverse KL on the student's tokens: TRL's beta = 1), lr and schedule, one optimizer
step per rollout, fp32 on CPU (bf16 on a GPU). TRL gets gradient checkpointing off (nanoseek does not
checkpoint) and CPU placement when there is no GPU. Reported: seconds per optimizer step (median after the
first, which pays one-time costs), completions per second, and TRL / nanoseek.

    pip install -e '.[bench]'     # trl
    python benchmarks/onpolicy.py [--model smollm2-135m] [--teacher HF_DIR] [--steps 5] [--prompts-per-step 8]
                                  [--max-new-tokens 48]

Without --teacher the student's own weights teach (the timing does not depend on what the teacher knows).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from grpo import step_clock  # benchmarks/grpo.py
from machine import cpu_name  # benchmarks/machine.py

LR = 1e-6


def prompts_for(task, tokenizer, n: int) -> tuple[list, list[str]]:
    """n train problems and their prompt text as nanoseek renders it (chat template, opened think block)."""
    from nanoseek.tasks.prompts import Template

    template = Template("chat", open_think=True)
    problems = task.problems("train", n)
    return problems, [tokenizer.decode(template.render(tokenizer, p).ids) for p in problems]


def nanoseek_steps(student: Path, teacher: Path, task, a, out: Path) -> list[float]:
    from nanoseek.train.finetune import finetune_config
    from nanoseek.train.loop import read_jsonl
    from nanoseek.train.onpolicy import OnPolicyConfig, run_onpolicy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ocfg = OnPolicyConfig(prompts_per_step=a.prompts_per_step, max_new_tokens=a.max_new_tokens, temperature=1.0,
                          open_think=True, gen_batch=a.prompts_per_step, seed=0)
    tcfg = finetune_config(str(out), steps=a.steps, lr=LR, schedule="constant", warmup_steps=0, device=device,
                           ckpt_every=0, log_every=1, plots=False)
    run_onpolicy(str(teacher), str(student), task, ocfg, tcfg)
    return [r["step_s"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]


def trl_steps(student: Path, teacher: Path, task, a, out: Path, cuda: bool) -> list[float]:
    """Seconds per step of TRL's DistillationTrainer configured like nanoseek's on-policy step."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    tok = AutoTokenizer.from_pretrained(student, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    _, texts = prompts_for(task, tok, a.prompts_per_step * (a.steps + 1))
    clock, times = step_clock()
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = DistillationConfig(output_dir=str(out), per_device_train_batch_size=a.prompts_per_step,
                             max_completion_length=a.max_new_tokens, max_steps=a.steps, learning_rate=LR,
                             lr_scheduler_type="constant", weight_decay=0.0, beta=1.0, temperature=1.0, top_p=1.0,
                             top_k=0, gradient_checkpointing=False, use_cpu=not cuda, bf16=cuda, logging_steps=1,
                             save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0,
                             disable_tqdm=True)
    trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student, dtype=dtype),
                                  teacher_model=AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype),
                                  args=cfg, train_dataset=Dataset.from_list([{"prompt": t} for t in texts]),
                                  processing_class=tok, callbacks=[clock])
    trainer.train()
    return times()


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="the student")
    ap.add_argument("--teacher", default=None, help="an HF directory with the student's tokenizer (default: the "
                                                    "student's own weights)")
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from nanoseek.tasks import get_task
    from nanoseek.weights.gguf import gguf_to_hf
    from nanoseek.weights.registry import resolve

    task = get_task(a.task, **({"digits": 3, "ops": "+-"} if a.task == "arithmetic" else {}))
    cuda = torch.cuda.is_available()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="nanoseek-onpolicy-bench-") as tmp:
        tmp = Path(tmp)
        path, _ = resolve(a.model)
        student = path if path.is_dir() else gguf_to_hf(path, tmp / "hf")   # the same weights for both
        teacher = Path(a.teacher) if a.teacher else student
        ours = nanoseek_steps(student, teacher, task, a, tmp / "nanoseek")
        theirs = trl_steps(student, teacher, task, a, tmp / "trl", cuda)
    load1 = os.getloadavg()
    n = a.prompts_per_step
    med_ours, med_theirs = statistics.median(ours[1:] or ours), statistics.median(theirs[1:] or theirs)
    device = torch.cuda.get_device_name() if cuda else f"{cpu_name()}, {torch.get_num_threads()} threads"
    rows = [("nanoseek distill onpolicy", med_ours, f"{med_theirs / med_ours:.2f}x"),
            ("TRL DistillationTrainer", med_theirs, "1.00x")]
    table = Table(title=f"On-policy distillation step, {a.model}: {n} student completions of ≤{a.max_new_tokens} "
                        "tokens, reverse KL to the teacher")
    for col in ("implementation", "s / step (median)", "completions / s", "speed vs TRL"):
        table.add_column(col)
    for name, s, ratio in rows:
        table.add_row(name, f"{s:.2f}", f"{n / s:.2f}", ratio)
    Console().print(table)
    out = Path(a.out or f"benchmarks/results/onpolicy-trl-{'gpu' if cuda else 'cpu'}-"
                        f"{time.strftime('%Y-%m-%d-%H%M')}.md")
    out.write_text("\n".join([
        "# On-policy distillation step throughput: nanoseek vs TRL", "",
        f"- machine: {device}, torch {torch.__version__}; load average {load0[0]:.1f} at the start, "
        f"{load1[0]:.1f} at the end",
        f"- command: `python benchmarks/onpolicy.py {' '.join(sys.argv[1:])}`",
        f"- per-step seconds, nanoseek: {json.dumps([round(x, 2) for x in ours])}",
        f"- per-step seconds, TRL: {json.dumps([round(x, 2) for x in theirs])}", "",
        "| implementation | s / step (median after the first) | completions / s | speed vs TRL |",
        "|---|---|---|---|",
        *[f"| {name} | {s:.2f} | {n / s:.2f} | {ratio} |" for name, s, ratio in rows], ""]))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
