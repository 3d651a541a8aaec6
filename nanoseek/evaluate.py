"""`nanoseek eval`: a task's test problems through the engine, scored as R1 reports reasoning models.

Protocol (DeepSeek-R1 §3, open-r1): k samples per problem at temperature 0.6, top-p 0.95; pass@1 is the mean
correctness over the k samples, averaged over problems; maj@k is the majority vote over the k extracted
answers (cons@k); pass@k is "any of the k right"; greedy is one temperature-0 completion. Every completion
(problems × k, plus the greedy ones) goes to the engine in one call, which decodes them in batches.

Each metric is given twice: `answer` reads the final answer leniently (tags, \\boxed, ####, last number), so a
model that never learned the format still gets an honest score; `strict` is the reward's own accuracy,
granted only to well-formed responses. A GRPO run moves both; the gap between them is format learning.

Confidence intervals are 95%, over problems: Wilson's interval for 0/1 scores (greedy, maj@k, pass@k and
pass@1 with k = 1), and the normal approximation of the mean for pass@1's per-problem fractions.
Sampling seeds come from (seed, problem id, sample index), so a rerun reproduces every sample and the
numbers before and after training are comparable sample for sample.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nanoseek.engine.request import Completion
from nanoseek.engine.sampling import SamplingParams
from nanoseek.errors import BadInputError
from nanoseek.files import write_text_atomic
from nanoseek.tasks import Problem, Task, Template
from nanoseek.tasks.tools import ToolTask

Z95 = 1.959963984540054


@dataclass
class EvalConfig:
    samples: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 512
    greedy: bool = True
    seed: int = 0
    template: str = "chat"
    open_think: bool = True
    split: str = "test"
    limit: int | None = None
    keep_samples: bool = False   # write every completion's text into the JSON report

    def validate(self) -> EvalConfig:
        if self.samples < 0 or (self.samples == 0 and not self.greedy):
            raise BadInputError("need --samples >= 1, or greedy decoding")
        if self.temperature <= 0 and self.samples:
            raise BadInputError("sampled metrics need --temperature > 0 (greedy is measured separately)")
        Template(self.template, self.open_think)
        SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p).validate()
        return self


@dataclass
class Sample:
    text: str
    tokens: int
    finish_reason: str | None
    answer: str | None          # lenient reading
    correct: bool
    strict_answer: str | None   # the answer block of a well-formed response
    strict_correct: bool        # = the reward's accuracy
    well_formed: bool
    reward: float


@dataclass
class ProblemResult:
    id: str
    gold: str
    samples: list[Sample] = field(default_factory=list)
    greedy: Sample | None = None


@dataclass
class Estimate:
    value: float
    low: float
    high: float
    n: int


@dataclass
class EvalReport:
    model: str
    task: str
    task_args: dict
    config: EvalConfig
    results: list[ProblemResult]
    metrics: dict[str, Estimate]
    stats: dict[str, float]


# ---------------------------------------------------------------------------------------------------------
# Statistics


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (good near 0 and 1, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 and n one end is exactly 0 or 1; the formula leaves float dust (5e-17) there.
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


def estimate(values: Sequence[float]) -> Estimate:
    """Mean over problems with a 95% interval: Wilson when every value is 0 or 1, else mean ± z·s/√n."""
    n = len(values)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    mean = sum(values) / n
    if all(v in (0.0, 1.0) for v in values):
        low, high = wilson(round(sum(values)), n)
    else:
        var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
        half = Z95 * math.sqrt(var / n)
        low, high = max(0.0, mean - half), min(1.0, mean + half)
    return Estimate(mean, low, high, n)


def majority(task: Task, answers: Sequence[str | None]) -> int | None:
    """Index of a sample holding the most common answer (by task.answer_key); ties go to the answer seen
    first; samples without an answer do not vote. None when nobody voted."""
    keys = [None if a is None else task.answer_key(a) for a in answers]
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return None
    winner = votes.most_common(1)[0][0]   # most_common keeps first-seen order among equal counts
    return keys.index(winner)


def summarize(task: Task, results: Sequence[ProblemResult]) -> dict[str, Estimate]:
    """The metrics table from per-problem results (the same function the tests recompute by hand)."""
    out: dict[str, Estimate] = {}
    for mode, ans, ok in (("answer", "answer", "correct"), ("strict", "strict_answer", "strict_correct")):
        sampled = [r for r in results if r.samples]
        if sampled:
            k = len(sampled[0].samples)
            out[f"{mode}/pass@1"] = estimate([sum(getattr(s, ok) for s in r.samples) / k for r in sampled])
            out[f"{mode}/maj@{k}"] = estimate([_maj_correct(task, r.samples, ans, ok) for r in sampled])
            out[f"{mode}/pass@{k}"] = estimate([float(any(getattr(s, ok) for s in r.samples)) for r in sampled])
        greedy = [r.greedy for r in results if r.greedy is not None]
        if greedy:
            out[f"{mode}/greedy"] = estimate([float(getattr(g, ok)) for g in greedy])
    return out


def _maj_correct(task: Task, samples: Sequence[Sample], ans: str, ok: str) -> float:
    i = majority(task, [getattr(s, ans) for s in samples])
    return 0.0 if i is None else float(getattr(samples[i], ok))


# ---------------------------------------------------------------------------------------------------------
# Running


def sample_seed(seed: int, problem_id: str, index: int) -> int:
    """A sampling seed per (run seed, problem, sample): independent of batching, limits and order."""
    digest = hashlib.blake2b(f"{seed}/{problem_id}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def score(task: Task, problem: Problem, text: str, *, started_in_think: bool, tokens: int,
          finish_reason: str | None) -> Sample:
    """One completion, read both ways."""
    answer = task.extract_answer(text, started_in_think=started_in_think)
    r = task.reward(text, problem, started_in_think=started_in_think, num_tokens=tokens)
    return Sample(text, tokens, finish_reason, answer, answer is not None and task.check(answer, problem),
                  r.answer, r.accuracy == 1.0, r.format == 1.0, r.total)


def completion_text(tokenizer, completion: Completion, stops: Sequence[str]) -> str:
    """The text to score: the generated tokens decoded with special tokens kept, up to and including the
    first stop string. Completion.text is not it: the engine cuts the stop string off (OpenAI-style), but
    the format check needs the closing `</answer>`; and it skips special tokens, which would also drop
    `<think>` tags in vocabularies that mark them special. The finishing token (EOS) is never in token_ids."""
    text = tokenizer.decode(completion.token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    ends = [i + len(s) for s in stops if (i := text.find(s)) >= 0]
    return text[:min(ends)] if ends else text


def evaluate(engine, tokenizer, task: Task, cfg: EvalConfig, problems: Sequence[Problem] | None = None, *,
             model_name: str = "", task_args: dict | None = None, progress: bool = True) -> EvalReport:
    """Generate and score. `engine` is a nanoseek Engine (its max_batch sets the decode batch); task_args
    (the task's constructor arguments) are recorded in the report so a later run can repeat the protocol."""
    from nanoseek.progress import progress_bar

    cfg.validate()
    if problems is None:
        problems = task.problems(cfg.split, cfg.limit)
    if not problems:
        raise BadInputError(f"task {task.name}: no problems to evaluate")
    template = Template(cfg.template, cfg.open_think)
    prompts = [template.render(tokenizer, p) for p in problems]
    jobs: list[tuple[int, int]] = []   # (problem index, sample index; -1 = greedy)
    params: list[SamplingParams] = []
    for i, p in enumerate(problems):
        for j in range(cfg.samples):
            jobs.append((i, j))
            params.append(SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                         seed=sample_seed(cfg.seed, p.id, j), stop=list(template.stop)))
        if cfg.greedy:
            jobs.append((i, -1))
            params.append(SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0, stop=list(template.stop)))

    t0 = time.perf_counter()
    if isinstance(task, ToolTask):   # multi-turn tool episodes (tasks/tools.py); scored on the last turn
        outs = _episodes(engine, tokenizer, task, [problems[i] for i, _ in jobs], params, cfg.open_think)
    else:
        with progress_bar(f"eval {task.name}", len(jobs)) if progress else nullcontext(lambda: None) as advance:
            outs = engine.generate([prompts[i].ids for i, _ in jobs], params,
                                   on_delta=lambda d: advance() if d.finish_reason is not None else None)
    gen_s = time.perf_counter() - t0

    results = [ProblemResult(p.id, p.answer) for p in problems]
    for (i, j), out in zip(jobs, outs):
        text = completion_text(tokenizer, out, template.stop)
        s = score(task, problems[i], text, started_in_think=prompts[i].starts_in_reasoning,
                  tokens=len(out.token_ids), finish_reason=out.finish_reason)
        if j < 0:
            results[i].greedy = s
        else:
            results[i].samples.append(s)
    every = [s for r in results for s in (*r.samples, *([r.greedy] if r.greedy else []))]
    tokens = sum(s.tokens for s in every)
    stats = {"problems": len(problems), "completions": len(every), "generated_tokens": tokens,
             "generate_s": round(gen_s, 3), "tokens_per_s": round(tokens / max(gen_s, 1e-9), 1),
             "format_rate": sum(s.well_formed for s in every) / len(every),
             "mean_reward": sum(s.reward for s in every) / len(every),
             "mean_tokens": tokens / len(every),
             "truncated_rate": sum(s.finish_reason == "length" for s in every) / len(every)}
    return EvalReport(model_name, task.name, dict(task_args or {}), cfg, results, summarize(task, results), stats)


def _episodes(engine, tokenizer, task, problems, params, open_think: bool) -> list[Completion]:
    """Tool episodes as Completions to score: the last turn's tokens; a sandbox violation scores as empty."""
    from nanoseek.tasks.tools import run_episodes

    outs = []
    for e in run_episodes(engine.generate, tokenizer, task, problems, params, open_think=open_think,
                          context=engine.context):
        last = [] if e.violation else tokenizer.encode(e.text, add_special_tokens=False)
        outs.append(Completion(len(outs), e.prompt_len, last, e.text, e.finish_reason))
    return outs


# ---------------------------------------------------------------------------------------------------------
# Output


def report_dict(report: EvalReport) -> dict:
    cfg = report.config
    problems = []
    for r in report.results:
        row = {"id": r.id, "gold": r.gold, "correct": sum(s.correct for s in r.samples),
               "strict_correct": sum(s.strict_correct for s in r.samples),
               "answers": [s.answer for s in r.samples]}
        if r.greedy is not None:
            row["greedy"] = {"answer": r.greedy.answer, "correct": r.greedy.correct,
                             "strict_correct": r.greedy.strict_correct}
        if cfg.keep_samples:
            row["samples"] = [asdict(s) for s in r.samples]
            if r.greedy is not None:
                row["greedy"] = asdict(r.greedy)
        problems.append(row)
    return {"model": report.model, "task": report.task, "task_args": report.task_args, "config": asdict(cfg),
            "metrics": {k: {"value": e.value, "ci95": [e.low, e.high], "n": e.n} for k, e in report.metrics.items()},
            "stats": report.stats, "problems": problems}


def write_report(report: EvalReport, path: str | os.PathLike) -> Path:
    """The JSON report, written atomically (temp file + rename)."""
    return write_text_atomic(path, json.dumps(report_dict(report), indent=1))


def print_report(report: EvalReport, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    names = sorted({k.split("/", 1)[1] for k in report.metrics}, key=_metric_order)
    cfg = report.config
    table = Table(title=f"{report.model} on {report.task} ({report.stats['problems']} problems, k={cfg.samples}, "
                        f"T={cfg.temperature}, top-p={cfg.top_p}, template {cfg.template})")
    table.add_column("metric")
    table.add_column("answer", justify="right")
    table.add_column("strict (format-gated)", justify="right")
    for name in names:
        table.add_row(name, *(_cell(report.metrics.get(f"{mode}/{name}")) for mode in ("answer", "strict")))
    console.print(table)
    s = report.stats
    console.print(f"format rate {s['format_rate']:.1%}, mean reward {s['mean_reward']:.3f}, "
                  f"mean length {s['mean_tokens']:.0f} tokens, truncated {s['truncated_rate']:.1%}; "
                  f"{s['completions']} completions, {s['generated_tokens']} tokens in {s['generate_s']:.1f} s "
                  f"({s['tokens_per_s']:.0f} tok/s)")


def _metric_order(name: str) -> tuple[int, str]:
    return ({"pass@1": 0, "greedy": 3}.get(name, 1 if name.startswith("maj") else 2), name)


def _cell(e: Estimate | None) -> str:
    if e is None:
        return "-"
    return f"{100 * e.value:.1f}% [{100 * e.low:.1f}, {100 * e.high:.1f}]"
