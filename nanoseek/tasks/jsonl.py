"""A task from any jsonl file of `{"prompt": ..., "answer": ...}` lines (optionally `"id"`).

prompt is the user's text or a list of chat messages; answer is a string or a number. Answers are compared
with rewards.answers_match: exact numeric value when the reference is a number, math-verify for LaTeX, else a
normalised string. Also home to `read_jsonl` and `split_path`, which the file-backed tasks share.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nanoseek.errors import BadInputError, NotFoundError
from nanoseek.tasks.base import Problem, RewardConfig, Task, check_split
from nanoseek.tasks.rewards import answers_match


def split_path(path: str | Path, split: str) -> Path:
    """A file is used whatever the split; a directory holds `<split>.jsonl` (as shared/data/gsm8k does)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / f"{check_split(split)}.jsonl"
    if not p.is_file():
        raise NotFoundError(f"{p}: no such file")
    return p


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an error naming
    the file and line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise BadInputError(f"{path}:{n}: expected a JSON object")
            yield n, obj


def get_field(obj: dict, name: str, path: Path, line: int, kinds: tuple[type, ...] = (str,)):
    value = obj.get(name)
    if value is None or isinstance(value, bool) or not isinstance(value, kinds):
        want = " or ".join(k.__name__ for k in kinds)
        raise BadInputError(f"{path}:{line}: field {name!r} must be a {want}")
    return value


class JsonlTask(Task):
    name = "jsonl"

    def __init__(self, path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer", *,
                 numeric: bool = True, rewards: RewardConfig | None = None):
        """numeric=False for non-numeric answers (LaTeX, words): lenient extraction then never falls back
        to the last number in the text."""
        super().__init__(rewards)
        self.path, self.prompt_field, self.answer_field = path, prompt_field, answer_field
        self.numeric = numeric

    def iter_problems(self, split: str = "test") -> Iterator[Problem]:
        path = split_path(self.path, split)
        for n, obj in read_jsonl(path):
            prompt = get_field(obj, self.prompt_field, path, n, (str, list))
            if isinstance(prompt, list) and not all(isinstance(m, dict) and "role" in m for m in prompt):
                raise BadInputError(f"{path}:{n}: field {self.prompt_field!r} must be text or a list of "
                                    "{role, content} messages")
            answer = get_field(obj, self.answer_field, path, n, (str, int, float))
            pid = obj.get("id")
            yield Problem(str(pid) if pid is not None else f"{path.stem}/{n}", prompt, str(answer))

    def check(self, answer: str, problem: Problem) -> bool:
        return answers_match(answer, problem.answer)

