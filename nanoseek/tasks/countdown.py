"""Countdown: reach a target with the given numbers, each used exactly once, and + - * / (TinyZero's task).

Problems are generated solvable: numbers are drawn, combined pairwise in a random order with random
operators, and the result is kept as the target when it is a whole number in [1, max_target]; that
construction is the reference answer. A response is right when its answer is an expression that uses
exactly the given numbers (as a multiset: no reuse, no extras, none left out) and equals the target
exactly. The expression is evaluated by expr.evaluate (a parse-tree walk over + - * / on integers), never
by eval(); division by zero, decimals, signs and any other syntax make it wrong. A trailing `= N` is allowed
and ignored: the expression is what gets checked.

Scores match TinyZero's countdown reward under the shared format gate: 1 right, format_bonus (0.1) for a
well-formed wrong answer, 0 for a malformed response.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction

from nanoseek.errors import BadInputError
from nanoseek.tasks.base import GeneratedTask, Problem, RewardConfig
from nanoseek.tasks.expr import ExprError, evaluate
from nanoseek.tasks.rewards import strip_wrappers

_CLAIM = re.compile(r"=\s*-?\d+(?:\.\d+)?\s*$")


class CountdownTask(GeneratedTask):
    name = "countdown"
    numeric = False

    def __init__(self, min_numbers: int = 3, max_numbers: int = 4, max_number: int = 99, max_target: int = 100,
                 *, seed: int = 0, test_size: int = 500, test_fraction: float = 0.1,
                 rewards: RewardConfig | None = None):
        super().__init__(seed=seed, test_size=test_size, test_fraction=test_fraction, rewards=rewards)
        if not 2 <= min_numbers <= max_numbers <= 8:
            raise BadInputError(f"countdown: need 2 <= min_numbers <= max_numbers <= 8, got "
                                f"{min_numbers}, {max_numbers}")
        if max_number < 1 or max_target < 1:
            raise BadInputError("countdown: max_number and max_target must be >= 1")
        self.min_numbers, self.max_numbers = min_numbers, max_numbers
        self.max_number, self.max_target = max_number, max_target

    def generate(self, rng: random.Random) -> tuple[str, str, str, dict] | None:
        nums = [rng.randint(1, self.max_number) for _ in range(rng.randint(self.min_numbers, self.max_numbers))]
        items: list[tuple[Fraction, str]] = [(Fraction(n), str(n)) for n in nums]
        while len(items) > 1:
            a = items.pop(rng.randrange(len(items)))
            b = items.pop(rng.randrange(len(items)))
            op = rng.choice("+-*/")
            if op == "/" and b[0] == 0:
                return None
            value = a[0] + b[0] if op == "+" else a[0] - b[0] if op == "-" else a[0] * b[0] if op == "*" \
                else a[0] / b[0]
            items.append((value, f"({a[1]} {op} {b[1]})"))
        target, solution = items[0]
        if target.denominator != 1 or not 1 <= target <= self.max_target:
            return None
        solution = solution[1:-1]
        key = f"{sorted(nums)}={target}"
        prompt = (f"Using the numbers {nums}, create an equation that equals {target}. You can use basic "
                  "arithmetic operations (+, -, *, /) and each number must be used exactly once. Give the "
                  "expression alone as the final answer, for example (1 + 2) / 3.")
        return key, prompt, solution, {"numbers": nums, "target": int(target)}

    def check(self, answer: str, problem: Problem) -> bool:
        return self.why_wrong(answer, problem) is None

    def why_wrong(self, answer: str, problem: Problem) -> str | None:
        """None for a right answer, else the reason (for tests and logs)."""
        expr = _CLAIM.sub("", strip_wrappers(answer)).strip()
        try:
            result = evaluate(expr, integers_only=True, allow_unary=False)
        except ExprError as e:
            return str(e)
        if sorted(result.numbers) != sorted(Fraction(n) for n in problem.meta["numbers"]):
            return f"uses {sorted(int(n) for n in result.numbers)}, not {sorted(problem.meta['numbers'])}"
        if result.value != problem.meta["target"]:
            return f"equals {result.value}, not {problem.meta['target']}"
        return None
