"""GSM8K grade-school math word problems, from a jsonl path (a file, or a folder holding train.jsonl and
test.jsonl).

Each line has `question` and `answer`, the answer being a worked solution ending in `#### N`; N (commas
allowed: `#### 1,000`) is the reference. A response is right when its answer has exactly N's value, so
`1000`, `1,000`, `$1,000.00` all count (nanochat and lm-eval compare the number after "####" the same way).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from nanoseek.errors import BadInputError
from nanoseek.tasks.base import Problem, RewardConfig, Task
from nanoseek.tasks.jsonl import get_field, read_jsonl, split_path
from nanoseek.tasks.rewards import format_number, parse_number


class Gsm8kTask(Task):
    name = "gsm8k"

    def __init__(self, path: str | Path, *, rewards: RewardConfig | None = None):
        super().__init__(rewards)
        self.path = path

    def iter_problems(self, split: str = "test") -> Iterator[Problem]:
        path = split_path(self.path, split)
        for n, obj in read_jsonl(path):
            question = get_field(obj, "question", path, n)
            solution = get_field(obj, "answer", path, n)
            _, sep, final = solution.rpartition("####")
            value = parse_number(final) if sep else None
            if value is None:
                raise BadInputError(f"{path}:{n}: field 'answer' must end in '#### <number>'")
            yield Problem(f"{path.stem}/{n}", question, format_number(value), {"solution": solution})

    def check(self, answer: str, problem: Problem) -> bool:
        value = parse_number(answer)
        return value is not None and value == parse_number(problem.answer)
