"""Arithmetic: generated expressions like `47 + 8 * 13`, with difficulty knobs.

digits (size of each operand), operands (how many), ops (which of + - * /). Answers are exact integers:
with `/` in play, candidates whose value is not a whole number (or that divide by zero) are redrawn.
Precedence is the usual one, so `*` before `+` is part of the skill. A small model can learn the easy
settings within a short GRPO run, which is why this task exists (r1-recipe-facts §8.3: SmolLM2-sized
models need easy synthetic tasks).
"""

from __future__ import annotations

import random

from nanoseek.errors import BadInputError
from nanoseek.tasks.base import GeneratedTask, Problem, RewardConfig
from nanoseek.tasks.expr import ExprError, evaluate
from nanoseek.tasks.rewards import parse_number


class ArithmeticTask(GeneratedTask):
    name = "arithmetic"

    def __init__(self, digits: int = 2, operands: int = 2, ops: str = "+-*", *, seed: int = 0,
                 test_size: int = 500, test_fraction: float = 0.1, rewards: RewardConfig | None = None):
        super().__init__(seed=seed, test_size=test_size, test_fraction=test_fraction, rewards=rewards)
        if not 1 <= digits <= 9:
            raise BadInputError(f"arithmetic: digits must be 1..9, got {digits}")
        if not 2 <= operands <= 8:
            raise BadInputError(f"arithmetic: operands must be 2..8, got {operands}")
        if not ops or set(ops) - set("+-*/"):
            raise BadInputError(f"arithmetic: ops must be made of + - * /, got {ops!r}")
        self.digits, self.operands, self.ops = digits, operands, "".join(sorted(set(ops)))

    def generate(self, rng: random.Random) -> tuple[str, str, str, dict] | None:
        low = 0 if self.digits == 1 else 10 ** (self.digits - 1)
        nums = [rng.randint(low, 10 ** self.digits - 1) for _ in range(self.operands)]
        ops = [rng.choice(self.ops) for _ in range(self.operands - 1)]
        expr = str(nums[0]) + "".join(f" {op} {n}" for op, n in zip(ops, nums[1:]))
        try:
            value = evaluate(expr).value
        except ExprError:   # division by zero
            return None
        if value.denominator != 1:
            return None
        return expr, f"What is {expr}?", str(value.numerator), {"expression": expr}

    def check(self, answer: str, problem: Problem) -> bool:
        value = parse_number(answer)
        return value is not None and value == int(problem.answer)
