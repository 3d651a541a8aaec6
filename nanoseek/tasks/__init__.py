"""Verifiable tasks with rule-based rewards, for evaluation, GRPO and SFT.

    task = get_task("arithmetic", digits=3)          # or "countdown", "gsm8k"/"jsonl" with path=...
    problems = task.problems("test", limit=100)      # Problem(id, prompt, answer, meta)
    prompt = Template("chat").render(tokenizer, problems[0])
    r = task.reward(completion_text, problems[0], started_in_think=prompt.starts_in_reasoning)

base.py holds the interface and the reward formula, rewards.py the format check, answer extraction and
equivalence, prompts.py the two prompt templates, expr.py safe expression evaluation; one module per task.
"""

from __future__ import annotations

import inspect
from types import MappingProxyType

from nanoseek.errors import BadInputError, NotFoundError
from nanoseek.tasks.arithmetic import ArithmeticTask
from nanoseek.tasks.base import Problem, RewardBreakdown, RewardConfig, Task
from nanoseek.tasks.countdown import CountdownTask
from nanoseek.tasks.gsm8k import Gsm8kTask
from nanoseek.tasks.jsonl import JsonlTask
from nanoseek.tasks.prompts import TEMPLATES, Template

TASKS = MappingProxyType({cls.name: cls for cls in (ArithmeticTask, CountdownTask, Gsm8kTask, JsonlTask)})

__all__ = ["TASKS", "TEMPLATES", "Problem", "RewardBreakdown", "RewardConfig", "Task", "Template", "get_task"]


def get_task(name: str, **kwargs) -> Task:
    """A task by name; kwargs go to its constructor (path=..., difficulty knobs, rewards=RewardConfig(...))."""
    cls = TASKS.get(name)
    if cls is None:
        raise NotFoundError(f"unknown task {name!r} (choose from {', '.join(TASKS)})")
    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in kwargs if k not in params or k == "self"]
    if unknown:
        allowed = ", ".join(p for p in params if p != "self")
        raise BadInputError(f"task {name!r} takes no argument {', '.join(map(repr, unknown))} (it takes: {allowed})")
    missing = [p.name for p in params.values()
               if p.name != "self" and p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        hint = " (--data PATH)" if missing == ["path"] else ""
        raise BadInputError(f"task {name!r} needs {', '.join(missing)}{hint}")
    return cls(**kwargs)
