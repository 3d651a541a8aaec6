"""The task interface that evaluation, GRPO and SFT share.

A Task yields Problems (an id, a prompt, a reference answer), reads a final answer out of a completion, checks
it, and scores a completion with a RewardBreakdown. Tasks never render prompts or run models: templates
(prompts.py) turn a Problem into token ids, and the engine makes the completions.

Reward (DeepSeek-R1 §2.2.2: rule-based accuracy and format rewards, no neural reward model):
    total = accuracy + (1 − accuracy) · format_bonus · format + length
accuracy is 1 only for a well-formed response whose answer is right (rewards.parse_response), so a right
answer outside the format earns nothing, and a well-formed wrong one earns only the bonus — TinyZero's
scores (1.0 correct, 0.1 format only, 0 otherwise) at the default bonus of 0.1. length is DAPO's soft
overlong punishment when `max_tokens` is set, else 0.

GeneratedTask is the base of the synthetic tasks: an endless seeded train stream and a fixed test set,
disjoint by hashing each problem's canonical key (so no seed can leak test problems into training).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from nanoseek.errors import BadInputError
from nanoseek.tasks.rewards import (extract_lenient, format_number, overlong_penalty, parse_number,
                                    parse_response, strip_wrappers)

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str | list[dict]   # the user's text, or whole chat messages ({"role", "content"})
    answer: str                # reference answer (for Countdown, one valid equation)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)   # task-specific (Countdown's numbers)


@dataclass(frozen=True)
class RewardConfig:
    format_bonus: float = 0.1        # for a well-formed response with a wrong answer (TinyZero's format_score)
    min_think_chars: int = 1         # non-space characters the reasoning must hold
    max_tokens: int | None = None    # DAPO overlong punishment: the hard limit L_max (None: no length term)
    overlong_buffer: int = 0         # ... and the soft ramp L_cache before it

    def validate(self) -> RewardConfig:
        if not 0 <= self.format_bonus < 1:
            raise BadInputError(f"format_bonus must be in [0, 1), got {self.format_bonus}")
        if self.min_think_chars < 0:
            raise BadInputError(f"min_think_chars must be >= 0, got {self.min_think_chars}")
        if self.max_tokens is not None and not 0 <= self.overlong_buffer < self.max_tokens:
            raise BadInputError(f"overlong_buffer must be in [0, max_tokens), got {self.overlong_buffer}")
        return self


@dataclass(frozen=True)
class RewardBreakdown:
    accuracy: float       # 1.0 right and well-formed, else 0.0
    format: float         # 1.0 well-formed, else 0.0
    length: float         # ≤ 0
    total: float
    answer: str | None    # the answer block's text when well-formed


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise BadInputError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    return split


class Task(ABC):
    name: ClassVar[str] = ""
    numeric: ClassVar[bool] = True   # answers are numbers: last-number fallback, votes by value

    def __init__(self, rewards: RewardConfig | None = None):
        self.rewards = (rewards or RewardConfig()).validate()

    @abstractmethod
    def iter_problems(self, split: str = "test") -> Iterator[Problem]:
        """Problems of a split, in a fixed order."""

    @abstractmethod
    def check(self, answer: str, problem: Problem) -> bool:
        """Is this extracted answer right?"""

    def problems(self, split: str = "test", limit: int | None = None) -> list[Problem]:
        check_split(split)
        if limit is not None and limit < 1:
            raise BadInputError(f"limit must be >= 1, got {limit}")
        return list(itertools.islice(self.iter_problems(split), limit))

    def extract_answer(self, completion: str, *, started_in_think: bool = False) -> str | None:
        """Lenient reading for evaluation (see rewards.extract_lenient); rewards use the strict format.
        started_in_think is accepted for symmetry with reward(); the lenient reading does not need it."""
        return extract_lenient(completion, last_number=self.numeric)

    def answer_key(self, answer: str) -> str:
        """What majority voting groups by: the exact value for numbers (`1,234` and `1234.0` vote together),
        else the answer with whitespace removed."""
        if self.numeric:
            value = parse_number(answer)
            if value is not None:
                return format_number(value)
        return "".join(strip_wrappers(answer).split())

    def reward(self, completion: str, problem: Problem, *, started_in_think: bool = False,
               num_tokens: int | None = None) -> RewardBreakdown:
        """Score one completion. started_in_think: the prompt ended with `<think>` (the completion begins
        inside the reasoning). num_tokens is needed when the config has a length term."""
        cfg = self.rewards
        parsed = parse_response(completion, started_in_think=started_in_think,
                                min_think_chars=cfg.min_think_chars)
        fmt = 1.0 if parsed.ok else 0.0
        acc = 1.0 if parsed.ok and self.check(parsed.answer, problem) else 0.0
        length = 0.0
        if cfg.max_tokens is not None:
            if num_tokens is None:
                raise BadInputError("this reward has a length term (max_tokens); pass num_tokens")
            length = overlong_penalty(num_tokens, cfg.max_tokens, cfg.overlong_buffer)
        total = acc + (1.0 - acc) * cfg.format_bonus * fmt + length
        return RewardBreakdown(acc, fmt, length, total, parsed.answer)


class GeneratedTask(Task):
    """Synthetic problems: `generate(rng)` makes one candidate; the split is decided by a hash of its key."""

    max_misses: ClassVar[int] = 20_000   # consecutive rejected candidates before the space counts as used up

    def __init__(self, *, seed: int = 0, test_size: int = 500, test_fraction: float = 0.1,
                 rewards: RewardConfig | None = None):
        super().__init__(rewards)
        if test_size < 1:
            raise BadInputError(f"test_size must be >= 1, got {test_size}")
        if not 0 < test_fraction < 1:
            raise BadInputError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.seed, self.test_size, self.test_fraction = seed, test_size, test_fraction

    @abstractmethod
    def generate(self, rng: random.Random) -> tuple[str, str, str, dict] | None:
        """One candidate (key, prompt, answer, meta), or None to reject it. The key names the problem
        canonically: two candidates with one key are the same problem."""

    def in_test(self, key: str) -> bool:
        digest = hashlib.sha256(f"{self.name}:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") < self.test_fraction * 2 ** 64

    def iter_problems(self, split: str = "test") -> Iterator[Problem]:
        """test: `test_size` distinct problems (fewer if the space runs out). train: endless, repeats allowed,
        never a test problem."""
        test = check_split(split) == "test"
        # A str seed is hashed with SHA-512, so the stream is the same in every process and Python version.
        rng = random.Random(f"{self.name}/{split}/{self.seed}")
        seen: set[str] = set()
        index = misses = 0
        while not test or index < self.test_size:
            made = self.generate(rng)
            if made is None or self.in_test(made[0]) != test or (test and made[0] in seen):
                misses += 1
                if misses > self.max_misses:
                    if test:
                        return
                    raise BadInputError(f"{self.name}: no train problems found at this difficulty "
                                        "(the problem space is too small)")
                continue
            key, prompt, answer, meta = made
            misses = 0
            if test:
                seen.add(key)
            yield Problem(f"{split}/{index}", prompt, answer, meta)
            index += 1

    def problems(self, split: str = "test", limit: int | None = None) -> list[Problem]:
        if split == "train" and limit is None:
            raise BadInputError(f"{self.name}: the train split is endless; give a limit")
        want = self.test_size if split == "test" and limit is None else limit
        if split == "test" and want > self.test_size:
            raise BadInputError(f"{self.name}: limit {want} is more than test_size {self.test_size}")
        out = super().problems(split, limit)
        if len(out) < want:
            raise BadInputError(f"{self.name}: only {len(out)} distinct {split} problems exist at this difficulty "
                                f"(asked for {want}); lower test_size or make the problems harder")
        return out
