"""GRPO step throughput: nanoseek vs TRL's GRPOTrainer (transformers generate, no vLLM), in one run.

Same model weights, task, prompts (the model's chat template), reward, group size, completions per step,
completion length, sampling temperature, loss (DAPO aggregation, β = 0, one update per rollout) and
precision. TRL gets gradient checkpointing off (nanoseek does not checkpoint) and CPU placement when there is
no GPU. Reported: seconds per optimizer step (median after the first, which pays one-time costs) and
completions per second, and nanoseek / TRL.

    pip install -e '.[bench]'     # trl
    python benchmarks/grpo.py [--model smollm2-135m] [--steps 5] [--group-size 4] [--prompts-per-step 2]
                              [--max-new-tokens 64] [--task arithmetic]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py: scripts import their neighbours


def nanoseek_steps(model: str, task, out: Path, *, group_size: int, prompts: int, steps: int, max_new_tokens: int,
                   device: str, cuda_graphs: bool = False) -> list[float]:
    """Seconds per step of nanoseek's GRPO (Trainer + Rollouts) on `model`, configured like trl_steps' TRL run.
    benchmarks/gpu.py runs the same function on a GPU (rollouts through CUDA graphs)."""
    from nanoseek.train.config import OptimConfig, RunConfig, TrainConfig
    from nanoseek.train.finetune import load_trainable
    from nanoseek.train.grpo import GRPOConfig, GRPOObjective, Rollouts
    from nanoseek.train.loop import Trainer, read_jsonl

    loaded = load_trainable(model, device)
    gcfg = GRPOConfig(group_size=group_size, prompts_per_step=prompts, max_new_tokens=max_new_tokens,
                      template="chat", open_think=False, gen_batch=group_size * prompts, seed=0,
                      cuda_graphs=cuda_graphs)
    tcfg = TrainConfig(optim=OptimConfig(lr=1e-6, schedule="constant", warmup_steps=0, weight_decay=0.0),
                       train=RunConfig(steps=steps, device=device, out_dir=str(out), eval_every=0, ckpt_every=0,
                                       plots=False, log_every=1, resume=False))
    source = Rollouts(loaded.model, loaded.tokenizer, task, gcfg, micro_batches=1)
    Trainer(tcfg, loaded.model, GRPOObjective(gcfg), source).fit()
    return [r["step_s"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]


def step_clock():
    """(a transformers TrainerCallback, times()): times() gives the seconds of each optimizer step since the
    callback was made. benchmarks/onpolicy.py times TRL's DistillationTrainer with it too."""
    from transformers import TrainerCallback

    marks = [time.perf_counter()]

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    return Clock(), lambda: [b - a for a, b in zip(marks, marks[1:])]


def trl_steps(hf_dir: Path, task, out: Path, *, group_size: int, prompts: int, steps: int, max_new_tokens: int,
              cuda: bool) -> list[float]:
    """Seconds per step of TRL's GRPOTrainer (no vLLM) on `hf_dir`, configured like nanoseek's GRPO step
    (DAPO loss, no KL, group-scaled rewards). benchmarks/gpu.py runs the same function on a GPU."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from nanoseek.tasks.base import Problem
    from nanoseek.tasks.prompts import Template

    template = Template("chat", open_think=False)
    problems = task.problems("train", prompts * (steps + 1))
    data = Dataset.from_list([{"prompt": template.messages(p), "answer": p.answer, "pid": p.id} for p in problems])

    def reward(completions, answer, pid, **_):
        return [task.reward(c[0]["content"] if isinstance(c, list) else c, Problem(i, "", ans)).total
                for c, ans, i in zip(completions, answer, pid)]

    clock, times = step_clock()
    cfg = GRPOConfig(output_dir=str(out), per_device_train_batch_size=group_size * prompts,
                     num_generations=group_size, max_completion_length=max_new_tokens, max_steps=steps,
                     learning_rate=1e-6, lr_scheduler_type="constant", weight_decay=0.0, beta=0.0, loss_type="dapo",
                     scale_rewards="group", temperature=1.0, gradient_checkpointing=False, use_cpu=not cuda,
                     bf16=cuda, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                     dataloader_num_workers=0, disable_tqdm=True)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                          callbacks=[clock])
    trainer.train()
    return times()


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from nanoseek.tasks import get_task
    from nanoseek.weights.gguf import gguf_to_hf
    from nanoseek.weights.registry import resolve

    task = get_task(a.task)
    with tempfile.TemporaryDirectory(prefix="nanoseek-grpo-bench-") as tmp:
        tmp = Path(tmp)
        path, _ = resolve(a.model)
        hf_dir = path if path.is_dir() else gguf_to_hf(path, tmp / "hf")   # the same weights for both
        ours = nanoseek_steps(str(hf_dir), task, tmp / "nanoseek", group_size=a.group_size,
                              prompts=a.prompts_per_step, steps=a.steps, max_new_tokens=a.max_new_tokens,
                              device="cuda" if torch.cuda.is_available() else "cpu")
        theirs = trl_steps(hf_dir, task, tmp / "trl", group_size=a.group_size, prompts=a.prompts_per_step,
                           steps=a.steps, max_new_tokens=a.max_new_tokens, cuda=torch.cuda.is_available())
    n = a.group_size * a.prompts_per_step
    med_ours, med_theirs = statistics.median(ours[1:] or ours), statistics.median(theirs[1:] or theirs)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"{cpu_name()}, {torch.get_num_threads()} threads"
    table = Table(title=f"GRPO step, {a.model}, {a.task}: {a.prompts_per_step} prompts x {a.group_size} completions "
                        f"of ≤{a.max_new_tokens} tokens")
    for col in ("implementation", "s / step (median)", "completions / s", "vs TRL"):
        table.add_column(col)
    table.add_row("nanoseek", f"{med_ours:.2f}", f"{n / med_ours:.2f}", f"{med_theirs / med_ours:.2f}x")
    table.add_row("TRL GRPOTrainer", f"{med_theirs:.2f}", f"{n / med_theirs:.2f}", "1.00x")
    Console().print(table)
    out = Path(a.out or f"benchmarks/results/grpo-trl-{'gpu' if torch.cuda.is_available() else 'cpu'}-"
                        f"{time.strftime('%Y-%m-%d-%H%M')}.md")
    out.write_text(f"# GRPO step throughput: nanoseek vs TRL\n\n- machine: {device}, torch {torch.__version__}\n"
                   f"- command: `python benchmarks/grpo.py {' '.join(sys.argv[1:])}`\n"
                   f"- per-step seconds, nanoseek: {json.dumps([round(x, 2) for x in ours])}\n"
                   f"- per-step seconds, TRL: {json.dumps([round(x, 2) for x in theirs])}\n\n"
                   f"| implementation | s / step (median after the first) | completions / s | vs TRL |\n"
                   f"|---|---|---|---|\n"
                   f"| nanoseek | {med_ours:.2f} | {n / med_ours:.2f} | {med_theirs / med_ours:.2f}x |\n"
                   f"| TRL GRPOTrainer | {med_theirs:.2f} | {n / med_theirs:.2f} | 1.00x |\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
