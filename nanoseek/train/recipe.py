"""The DeepSeek-R1 recipe in one command (`nanoseek recipe r1`): cold-start SFT → GRPO, evaluated the same way
before and after each stage, then a report card.

R1 (§2.3.1) starts RL from a "cold start": a little supervised data in the target format, so that the policy
writes rewardable outputs at all. Without it a small model never writes `<think>…</think><answer>…</answer>`,
every GRPO group has the same reward, and there is nothing to learn. The stages:

  1. cold-start data: worked solutions of the task's *train* problems in the format (the arithmetic written
     out as the reasoning) — or a chat jsonl the user gives;
  2. eval of the starting model; SFT on the cold-start data; eval; GRPO from the SFT model; eval — the same
     held-out problems, seeds and protocol every time (nanoseek.evaluate);
  3. optionally (`--distill`), the GRPO model as teacher distilled into a fresh student two ways at the same
     student compute: SFT on its rejection-sampled traces (R1 §2.4) and on-policy distillation (V4); each
     student evaluated like the other stages;
  4. the report card: report.md with pass@1 and its 95% interval per stage, and PNGs of the GRPO run.

Each stage is a function of typed configs, so other recipes compose them differently. The whole is resumable:
finished stages leave their outputs (an eval JSON, a `.done` file) and are skipped, and an interrupted
training stage resumes from its newest checkpoint. Layout of OUT: recipe.json, cold_start.jsonl, eval/*.json,
sft/ and grpo/ (ordinary run directories, each with final/), with --distill distill/traces.jsonl, sft-traces/
and onpolicy/, report.md and *.png.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.errors import BadInputError, UnsupportedError
from nanoseek.evaluate import EvalConfig
from nanoseek.files import write_text_atomic
from nanoseek.tasks.base import Problem, Task
from nanoseek.train.grpo import GRPOConfig


@dataclass
class ColdStartConfig:
    data: str | None = None      # a chat jsonl to use; None: worked solutions written for the task
    conversations: int = 400     # how many to write
    steps: int = 30
    lr: float = 5e-5
    warmup_steps: int = 3
    seq_len: int = 256
    batch_size: int = 4
    ckpt_every: int = 10


@dataclass
class RLStageConfig:
    steps: int = 8               # rollouts (× grpo.inner_updates optimizer steps)
    lr: float = 5e-6
    warmup_steps: int = 0
    ckpt_every: int = 2          # rollouts are the slow part: checkpoint often, so a kill loses little
    # β = 0.001 is R1-Zero's KL weight: small enough not to hold learning back, and it makes the run measure
    # the KL to the SFT model (β = 0 loads no reference, so there would be no KL to plot).
    grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(group_size=4, prompts_per_step=4,
                                                                max_new_tokens=48, beta=0.001))


@dataclass
class StageEvalConfig:
    problems: int = 100          # held-out test problems, the same ones at every stage
    protocol: EvalConfig = field(default_factory=lambda: EvalConfig(samples=2, max_tokens=48))
    batch_size: int = 64         # completions decoded together
    # One weight format for every stage (the base may be a Q4 GGUF, the fine-tunes fp32): int8 with group
    # scales on CPU, the loaded dtype on GPU.
    quant: str = "auto"


@dataclass
class DistillStageConfig:
    """The optional last stage (`--distill`): the recipe's trained model as teacher, distilled into a fresh
    student two ways at the same student compute — SFT on the teacher's rejection-sampled traces (R1 §2.4) and
    on-policy distillation (V4: the student samples, the teacher scores every token). Both arms take `steps`
    optimizer steps at the same lr and schedule, on about the same tokens per step: `prompts_per_step` student
    completions vs `sft_rows` packed rows of `seq_len`, which hold about as many conversations (≈2 of the
    ~110-token arithmetic ones per 256-token row). Each arm's measured token count is in its `.done` file."""

    enabled: bool = False
    teacher: str = "grpo"        # a stage (sft, grpo) or a model path
    student: str = "base"        # a stage (base, sft, grpo) or a model path
    steps: int = 30
    lr: float = 5e-5
    warmup_steps: int = 3
    prompts_per_step: int = 8    # on-policy arm: student completions per step
    max_new_tokens: int = 48
    sft_rows: int = 4            # trace arm: packed rows per step
    seq_len: int = 256
    trace_problems: int = 300    # train problems the teacher answers; its correct replies are kept
    trace_samples: int = 2
    ckpt_every: int = 10


@dataclass
class RecipeConfig:
    model: str = "smollm2-135m"
    task: str = "arithmetic"
    task_args: dict[str, Any] = field(default_factory=dict)
    out_dir: str = "runs/r1"
    device: str = "auto"
    seed: int = 0
    plots: bool = True
    log: str = "jsonl"
    # The training stages' arithmetic: "auto" is bf16 autocast on CUDA and fp32 on CPU; "bf16" on a CPU with
    # AMX (Sapphire Rapids and later) trains ~1.8x faster (fp32 master weights either way).
    precision: str = "auto"
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    rl: RLStageConfig = field(default_factory=RLStageConfig)
    eval: StageEvalConfig = field(default_factory=StageEvalConfig)
    distill: DistillStageConfig = field(default_factory=DistillStageConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# Task settings the presets use when the command names none: 2-digit + and − is what a 135M model can learn
# on a CPU budget (its base accuracy is ~5%; with × it stays near 0 and RL has no signal).
DEFAULT_TASK_ARGS = {"arithmetic": {"digits": 2, "ops": "+-"}}


def preset(name: str) -> RecipeConfig:
    """cpu: under 15 minutes on 2 cores (SmolLM2-135M). gpu: a real run on one GPU (SmolLM2-360M or a
    Qwen2.5-0.5B-class model): more cold start, 200 GRPO rollouts of 16 prompts × 8, DAPO clip-higher."""
    if name == "cpu":
        return RecipeConfig()
    if name == "gpu":
        return RecipeConfig(
            cold_start=ColdStartConfig(conversations=2000, steps=200, lr=2e-5, warmup_steps=10, seq_len=512,
                                       batch_size=16, ckpt_every=50),
            rl=RLStageConfig(steps=200, lr=1e-6, ckpt_every=20,
                             grpo=GRPOConfig(group_size=8, prompts_per_step=16, max_new_tokens=256, beta=0.001,
                                             eps_high=0.28, dynamic_sampling=True, gen_batch=128)),
            eval=StageEvalConfig(problems=500, protocol=EvalConfig(samples=4, max_tokens=256), batch_size=256))
    raise BadInputError(f"--preset {name!r}: cpu or gpu")


# ------------------------------------------------------------------------------------------------- stages


def worked_reasoning(task: Task, problem: Problem) -> str | None:
    """A short worked solution of a problem, as cold-start reasoning; None when the task has none to give."""
    if "expression" in problem.meta:                        # arithmetic
        return f"{problem.meta['expression']} = {problem.answer}"
    if "numbers" in problem.meta and "target" in problem.meta:   # countdown: the generator's own equation
        return f"Using {problem.meta['numbers']}: {problem.answer} = {problem.meta['target']}"
    if "solution" in problem.meta:                          # gsm8k: the reference solution before ####
        return problem.meta["solution"].rpartition("####")[0].strip() or None
    return None


def write_cold_start(task: Task, path: Path, n: int) -> Path:
    """`n` train problems with their worked solutions as SFT conversations: the reasoning in
    `reasoning_content`, the answer in the task's answer tags (data in the format, not picked answers)."""
    from nanoseek.tasks.prompts import Template

    template = Template("chat", open_think=False)
    rows = []
    for p in task.problems("train", n):
        reasoning = worked_reasoning(task, p)
        if reasoning is None:
            raise UnsupportedError(f"task {task.name} has no worked solutions to write cold-start data from: "
                                   "give a chat jsonl with --sft-data")
        reply = {"role": "assistant", "reasoning_content": reasoning, "content": f"<answer>{p.answer}</answer>"}
        rows.append(json.dumps({"messages": [*template.messages(p), reply]}, ensure_ascii=False))
    write_text_atomic(path, "\n".join(rows) + "\n")
    return path


def _stage_session(model: str, cfg: StageEvalConfig, device: str):
    """`model` loaded for generation the way every stage's eval (and the distillation teacher) runs it: the
    stage eval's one weight format (StageEvalConfig.quant) and batch size."""
    from nanoseek.session import LoadOptions, Session

    quant = cfg.quant if cfg.quant != "auto" else ("int8-group" if device == "cpu" else "none")
    s = Session(LoadOptions(model=model, device=device, quant=quant))
    s.engine.max_batch = cfg.batch_size
    return s


def evaluate_stage(model: str, task: Task, problems: list[Problem], cfg: StageEvalConfig, out: Path, *,
                   device: str = "cpu", task_args: dict | None = None) -> dict[str, Any]:
    """The eval protocol on `model`, written to `out` (JSON, as `nanoseek eval --out`); returns that dict."""
    from nanoseek.evaluate import evaluate, report_dict, write_report

    s = _stage_session(model, cfg, device)
    report = evaluate(s.engine, s.tokenizer, task, cfg.protocol, problems, model_name=s.name, task_args=task_args)
    write_report(report, out)
    return report_dict(report)


def run_cold_start(model: str, data: str | Path, cfg: ColdStartConfig, out_dir: Path, *, device: str = "auto",
                   seed: int = 0, plots: bool = True, log: str = "jsonl", precision: str = "auto") -> Path:
    """SFT `model` on `data`; returns the fine-tuned HF directory (out_dir/final)."""
    from nanoseek.train.finetune import finetune_config
    from nanoseek.train.sft import run_sft

    tcfg = finetune_config(str(out_dir), steps=cfg.steps, lr=cfg.lr, schedule="cosine",
                           warmup_steps=cfg.warmup_steps, seed=seed, device=device, ckpt_every=cfg.ckpt_every,
                           log_every=1, plots=plots, log=log, precision=precision)
    run_sft(model, data, tcfg, seq_len=cfg.seq_len, batch_size=cfg.batch_size)
    return out_dir / "final"


def run_rl(model: str, task: Task, cfg: RLStageConfig, out_dir: Path, *, device: str = "auto", seed: int = 0,
           plots: bool = True, log: str = "jsonl", precision: str = "auto") -> Path:
    """GRPO from `model` on `task`; returns the trained HF directory (out_dir/final)."""
    from nanoseek.train.finetune import finetune_config
    from nanoseek.train.grpo import run_grpo

    gcfg = dataclasses.replace(cfg.grpo, seed=seed).validate()
    tcfg = finetune_config(str(out_dir), steps=cfg.steps * gcfg.inner_updates, lr=cfg.lr, schedule="constant",
                           warmup_steps=cfg.warmup_steps, seed=seed, device=device, ckpt_every=cfg.ckpt_every,
                           log_every=1, plots=plots, log=log, precision=precision)
    run_grpo(model, task, gcfg, tcfg)
    return out_dir / "final"


def write_teacher_traces(teacher: str, task: Task, d: DistillStageConfig, ev: StageEvalConfig, out: Path, *,
                         device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """The teacher answers `d.trace_problems` train problems `d.trace_samples` times with the eval's sampling;
    its correct, well-formed replies become chat jsonl (distill.generate_traces, R1 §2.3.3's rejection
    sampling). Returns its counts."""
    from nanoseek.train.distill import generate_traces

    s = _stage_session(teacher, ev, device)
    p = ev.protocol
    return generate_traces(s.engine, s.tokenizer, task, task.problems("train", d.trace_problems), out,
                           samples=d.trace_samples, max_tokens=d.max_new_tokens, temperature=p.temperature,
                           top_p=p.top_p, keep="correct", seed=seed, open_think=p.open_think)


def run_onpolicy_arm(teacher: str, student: str, task: Task, d: DistillStageConfig, ev: StageEvalConfig,
                     out_dir: Path, *, device: str = "auto", seed: int = 0, plots: bool = True,
                     log: str = "jsonl", precision: str = "auto") -> Path:
    """On-policy distillation of `teacher` into `student` on the task's prompts, with the trace arm's optimizer
    settings; returns out_dir/final."""
    from nanoseek.train.finetune import finetune_config
    from nanoseek.train.onpolicy import OnPolicyConfig, run_onpolicy

    ocfg = OnPolicyConfig(prompts_per_step=d.prompts_per_step, max_new_tokens=d.max_new_tokens,
                          template=ev.protocol.template, open_think=ev.protocol.open_think, gen_batch=ev.batch_size,
                          seed=seed)
    tcfg = finetune_config(str(out_dir), steps=d.steps, lr=d.lr, schedule="cosine", warmup_steps=d.warmup_steps,
                           seed=seed, device=device, ckpt_every=d.ckpt_every, log_every=1, plots=plots, log=log,
                           precision=precision)
    run_onpolicy(teacher, student, task, ocfg, tcfg)
    return out_dir / "final"


def _student_tokens(run_dir: Path) -> int:
    """Tokens through the student's training forward over a run, padding included (the compute both arms are
    matched on): SFT's packed rows, or on-policy's padded rollout batches."""
    from nanoseek.train.loop import read_jsonl

    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    if recs and "batch_tokens" in recs[-1]:
        return int(sum(r["batch_tokens"] for r in recs))
    return int(recs[-1]["tokens"]) if recs else 0


def run_distill_stage(cfg: RecipeConfig, out: Path, task: Task, models: dict[str, str], evaluate) -> None:
    """The distillation stage (DistillStageConfig): the teacher's traces, then each arm from the same student,
    each evaluated like every other stage; every part is skipped once done."""
    d, device = cfg.distill, resolve_device(cfg.device)
    teacher, student = models.get(d.teacher, d.teacher), models.get(d.student, d.student)
    traces = out / "distill" / "traces.jsonl"
    if _stage(out, "traces") is None:
        _say(f"distill: the teacher ({teacher}) answers {d.trace_problems} train problems × {d.trace_samples}")
        t0 = time.perf_counter()
        counts = write_teacher_traces(teacher, task, d, cfg.eval, traces, device=device, seed=cfg.seed)
        if not counts["kept"]:
            raise BadInputError(f"the teacher {teacher} answered none of {counts['completions']} train problems "
                                "correctly in the format: nothing to distil by traces (a stronger teacher, or more "
                                "--set distill.trace_samples)")
        _finish(out, "traces", time.perf_counter() - t0, **counts)
        _say(f"distill: kept {counts['kept']} of {counts['completions']} teacher replies")
    arm = ColdStartConfig(data=str(traces), steps=d.steps, lr=d.lr, warmup_steps=d.warmup_steps, seq_len=d.seq_len,
                          batch_size=d.sft_rows, ckpt_every=d.ckpt_every)
    if _stage(out, "sft-traces") is None:
        _say(f"distill: SFT of {student} on the teacher's traces, {d.steps} steps")
        t0 = time.perf_counter()
        run_cold_start(student, traces, arm, out / "sft-traces", device=cfg.device, seed=cfg.seed, plots=cfg.plots,
                       log=cfg.log, precision=cfg.precision)
        _finish(out, "sft-traces", time.perf_counter() - t0, student_tokens=_student_tokens(out / "sft-traces"))
    evaluate("sft-traces")
    if _stage(out, "onpolicy") is None:
        _say(f"distill: on-policy distillation of {teacher} into {student}, {d.steps} steps")
        t0 = time.perf_counter()
        run_onpolicy_arm(teacher, student, task, d, cfg.eval, out / "onpolicy", device=cfg.device, seed=cfg.seed,
                         plots=cfg.plots, log=cfg.log, precision=cfg.precision)
        _finish(out, "onpolicy", time.perf_counter() - t0, student_tokens=_student_tokens(out / "onpolicy"))
    evaluate("onpolicy")


# ------------------------------------------------------------------------------------------------- the whole


def _say(msg: str) -> None:
    print(f"recipe: {msg}", file=sys.stderr, flush=True)


def _check_same_recipe(out: Path, cfg: RecipeConfig) -> None:
    """A re-run continues the recipe in OUT; one with other settings would mix two experiments."""
    state = out / "recipe.json"
    now = cfg.to_dict()
    if state.is_file():
        # A top-level setting added since the run began (precision) was at its default then.
        defaults = RecipeConfig().to_dict()
        saved = json.loads(state.read_text())
        saved = {**{k: defaults[k] for k in defaults if k not in saved}, **saved}
        # How it runs is not what it is: a run may continue on another device, with or without plots. And the
        # distillation stage comes last, so a recipe that has not run it may be extended by it (`--distill`)
        # without redoing the rest; once it has run, its settings are part of the experiment like any other.
        extend = not (saved.get("distill") or {}).get("enabled")
        ignore = RUN_ONLY + (("distill",) if extend else ())
        a = {k: v for k, v in saved.items() if k not in ignore}
        b = {k: v for k, v in now.items() if k not in ignore}
        if a != b:
            changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise BadInputError(f"{out} holds a recipe run with other settings ({', '.join(changed)}): choose a "
                                "new --out, or repeat the original command to continue it")
        if extend and cfg.distill.enabled:
            write_text_atomic(state, json.dumps({**saved, "distill": now["distill"]}, indent=1) + "\n")
    else:
        write_text_atomic(state, json.dumps(now, indent=1) + "\n")


RUN_ONLY = ("device", "plots", "log")


def _stage(out: Path, name: str) -> dict | None:
    f = out / f"{name}.done"
    return json.loads(f.read_text()) if f.is_file() else None


def _finish(out: Path, name: str, seconds: float, **extra) -> None:
    write_text_atomic(out / f"{name}.done", json.dumps({"seconds": round(seconds, 1), **extra}) + "\n")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def run_recipe(cfg: RecipeConfig) -> Path:
    """Run (or continue) the whole recipe in cfg.out_dir; returns the report card's path."""
    from nanoseek.tasks import get_task
    from nanoseek.train.report_card import write_report_card

    # Settings are checked before minutes of work, not when their stage comes.
    dataclasses.replace(cfg.rl.grpo, seed=cfg.seed).validate()
    cfg.eval.protocol.validate()
    if cfg.eval.problems < 1 or cfg.cold_start.steps < 1 or cfg.rl.steps < 1:
        raise BadInputError("the recipe needs ≥ 1 eval problem, SFT step and GRPO step")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise BadInputError(f"recipe precision {cfg.precision!r}: auto, fp32 or bf16")
    if cfg.distill.enabled:
        _check_distill(cfg.distill)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_recipe(out, cfg)
    device = resolve_device(cfg.device)
    task = get_task(cfg.task, **cfg.task_args)
    problems = task.problems("test", cfg.eval.problems)
    data = Path(cfg.cold_start.data) if cfg.cold_start.data else out / "cold_start.jsonl"
    if not cfg.cold_start.data and not data.is_file():
        write_cold_start(task, data, cfg.cold_start.conversations)
        _say(f"wrote {cfg.cold_start.conversations} cold-start conversations to {data}")
    models = {"base": cfg.model, **{s: str(out / s / "final") for s in ("sft", "grpo", "sft-traces", "onpolicy")}}

    def evaluate(stage: str) -> None:
        path = out / "eval" / f"{stage}.json"
        if path.is_file():
            return
        _say(f"eval {stage}: {models[stage]} on {len(problems)} held-out problems")
        t0 = time.perf_counter()
        rep = evaluate_stage(models[stage], task, problems, cfg.eval, path, device=device, task_args=cfg.task_args)
        strict = rep["metrics"]["strict/pass@1"]
        _say(f"eval {stage}: strict pass@1 {strict['value']:.3f} [{strict['ci95'][0]:.3f}, "
             f"{strict['ci95'][1]:.3f}], format rate {rep['stats']['format_rate']:.3f} "
             f"({time.perf_counter() - t0:.0f} s)")

    evaluate("base")
    if _stage(out, "sft") is None:
        _say(f"cold-start SFT: {cfg.cold_start.steps} steps on {data}")
        t0 = time.perf_counter()
        run_cold_start(cfg.model, data, cfg.cold_start, out / "sft", device=cfg.device, seed=cfg.seed,
                       plots=cfg.plots, log=cfg.log, precision=cfg.precision)
        _finish(out, "sft", time.perf_counter() - t0)
    evaluate("sft")
    if _stage(out, "grpo") is None:
        _say(f"GRPO: {cfg.rl.steps} rollouts of {cfg.rl.grpo.prompts_per_step} prompts × {cfg.rl.grpo.group_size}")
        t0 = time.perf_counter()
        run_rl(models["sft"], task, cfg.rl, out / "grpo", device=cfg.device, seed=cfg.seed, plots=cfg.plots,
               log=cfg.log, precision=cfg.precision)
        _finish(out, "grpo", time.perf_counter() - t0)
    evaluate("grpo")
    if cfg.distill.enabled:
        run_distill_stage(cfg, out, task, models, evaluate)
    return write_report_card(out, cfg, plots=cfg.plots)


def _check_distill(d: DistillStageConfig) -> None:
    if min(d.steps, d.prompts_per_step, d.sft_rows, d.trace_problems, d.trace_samples, d.max_new_tokens) < 1:
        raise BadInputError("distill: steps, prompts_per_step, sft_rows, trace_problems, trace_samples and "
                            "max_new_tokens must be ≥ 1")
    if d.teacher in ("base", "sft-traces", "onpolicy") or d.student in ("sft-traces", "onpolicy"):
        raise BadInputError(f"distill: the teacher is a trained stage (sft, grpo) or a model path, the student a "
                            f"stage before distillation (base, sft, grpo) or a path; got teacher {d.teacher!r}, "
                            f"student {d.student!r}")


def with_overrides(cfg: RecipeConfig, **changes) -> RecipeConfig:
    """A copy of `cfg` with dotted fields replaced: with_overrides(cfg, **{"rl.steps": 4})."""
    cfg = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        node = cfg
        *path, last = dotted.split(".")
        for p in path:
            if not dataclasses.is_dataclass(node) or not hasattr(node, p):
                raise BadInputError(f"recipe setting {dotted!r} does not exist")
            node = getattr(node, p)
        if not dataclasses.is_dataclass(node) or last not in {f.name for f in dataclasses.fields(node)}:
            raise BadInputError(f"recipe setting {dotted!r} does not exist")
        old = getattr(node, last)
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if old is not None and value is not None and not isinstance(value, type(old)):
            raise BadInputError(f"recipe setting {dotted}: expected {type(old).__name__}, got {value!r}")
        setattr(node, last, value)
    return cfg
