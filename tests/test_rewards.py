"""Rewards: the R1 format gate against format-hacking attempts, answer extraction, numeric and LaTeX
equivalence, the length penalty."""

from fractions import Fraction

import pytest

from nanoseek.errors import BadInputError
from nanoseek.tasks import RewardConfig, get_task
from nanoseek.tasks import rewards as R
from nanoseek.tasks.base import Problem

GOOD = "<think>\n5 * 3 = 15, plus 3 is 18\n</think>\n<answer>18</answer>"


@pytest.mark.parametrize("text, started", [
    (GOOD, False),
    ("  <think>x</think><answer>18</answer>  \n", False),
    ("\n5 * 3 = 15\n</think> <answer> 18 </answer>", True),   # the prompt opened <think>
])
def test_well_formed(text, started):
    p = R.parse_response(text, started_in_think=started)
    assert p.ok and p.answer == "18", p.problem


HACKS = {
    "answer inside think only": "<think>it is <answer>18</answer></think>",
    "answer in think and after": "<think><answer>18</answer></think><answer>18</answer>",
    "no answer block": "<think>18</think>18",
    "two think blocks": "<think>a</think><think>b</think><answer>18</answer>",
    "two answer blocks": "<think>a</think><answer>17</answer><answer>18</answer>",
    "text after the answer": "<think>a</think><answer>18</answer> and also 17",
    "missing </think>": "<think>so 18 <answer>18</answer>",
    "missing </answer>": "<think>a</think><answer>18",
    "empty think": "<think>  \n </think><answer>18</answer>",
    "empty answer": "<think>a</think><answer> </answer>",
    "text before think": "Sure! <think>a</think><answer>18</answer>",
    "text between blocks": "<think>a</think> So: <answer>18</answer>",
    "answer before think": "<answer>18</answer><think>a</think>",
    "reopened think after prompt's": "<think>a</think><answer>18</answer>",   # started_in_think below
    "no tags at all": "The answer is 18.",
}


@pytest.mark.parametrize("name", HACKS)
def test_format_hacks_are_malformed_and_earn_nothing(name):
    started = name.startswith("reopened")
    text = HACKS[name]
    assert not R.parse_response(text, started_in_think=started).ok
    task = get_task("arithmetic")
    r = task.reward(text, Problem("p", "What is 5 * 3 + 3?", "18"), started_in_think=started)
    assert (r.accuracy, r.format, r.total) == (0.0, 0.0, 0.0)


def test_reward_scores():
    task = get_task("arithmetic")
    prob = Problem("p", "What is 5 * 3 + 3?", "18")
    right = task.reward(GOOD, prob)
    assert (right.accuracy, right.format, right.total, right.answer) == (1.0, 1.0, 1.0, "18")
    for wrong in ("17", "18 or 19", "18, 19", "about 18", "$18$ $19$", "1,8"):   # hedges and junk get the bonus only
        r = task.reward(f"<think>hmm</think><answer>{wrong}</answer>", prob)
        assert (r.accuracy, r.format) == (0.0, 1.0) and r.total == pytest.approx(0.1), wrong
    for ok in ("18.0", "$18", "\\boxed{18}", "$\\boxed{18}$", "18."):
        assert task.reward(f"<think>hmm</think><answer>{ok}</answer>", prob).accuracy == 1.0, ok
    # The right answer without the format earns nothing: accuracy is gated on format.
    assert task.reward("18", prob).total == 0.0
    strict = get_task("arithmetic", rewards=RewardConfig(format_bonus=0.0))
    assert strict.reward("<think>hmm</think><answer>17</answer>", prob).total == 0.0


def test_length_penalty():
    assert [R.overlong_penalty(n, 100, 20) for n in (10, 80, 90, 100, 101)] == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert R.overlong_penalty(100, 100, 0) == 0.0 and R.overlong_penalty(101, 100, 0) == -1.0
    task = get_task("arithmetic", rewards=RewardConfig(max_tokens=100, overlong_buffer=20))
    prob = Problem("p", "q", "18")
    assert task.reward(GOOD, prob, num_tokens=90).total == pytest.approx(0.5)
    assert task.reward(GOOD, prob, num_tokens=50).total == 1.0
    with pytest.raises(BadInputError, match="num_tokens"):
        task.reward(GOOD, prob)
    with pytest.raises(BadInputError, match="overlong_buffer"):
        RewardConfig(max_tokens=10, overlong_buffer=10).validate()


@pytest.mark.parametrize("text, value", [
    ("1234", 1234), ("1,234", 1234), ("1,234,567.5", Fraction(2469135, 2)), ("1234.0", 1234), ("$12", 12),
    ("\\$12", 12), ("-$5", -5), ("$-5", -5), ("12%", 12), ("12\\%", 12), ("12.", 12), ("3/4", Fraction(3, 4)),
    ("-3 / 4", Fraction(-3, 4)), ("\\frac{3}{4}", Fraction(3, 4)), ("\\dfrac{1}{2}", Fraction(1, 2)),
    ("-\\frac{1}{2}", Fraction(-1, 2)), ("\\boxed{18}", 18), ("$\\boxed{1,000}$", 1000), ("0.1", Fraction(1, 10)),
    ("1e3", 1000), (".5", Fraction(1, 2)), (" +7 ", 7), ("€3", 3),
])
def test_parse_number(text, value):
    assert R.parse_number(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1,23", "12,3456", "12 or 13", "1/0", "\\frac{1}{0}", "--5", "5-",
                                  "1.2.3", "$", "x=5", "\\boxed{12", "12 13", "0x1F", "inf", "nan"])
def test_parse_number_rejects(text):
    assert R.parse_number(text) is None


def test_answers_match_numeric_and_latex():
    assert R.answers_match("1,234", "1234") and R.answers_match("1234.00", "1,234")
    assert R.answers_match("0.5", "\\frac{1}{2}") and R.answers_match("1/2", "0.5")
    assert not R.answers_match("0.333333", "1/3")        # exact, no float tolerance
    assert not R.answers_match("2+1", "3")               # a numeric reference needs a number
    assert not R.answers_match("3 or 4", "3")
    assert R.answers_match("\\sqrt 2", "\\sqrt{2}")      # math-verify
    assert R.answers_match("\\frac{\\pi}{2}", "\\pi/2")
    assert R.answers_match("1+x^2", "x^2+1")
    assert not R.answers_match("\\sqrt{3}", "\\sqrt{2}")
    assert not R.answers_match("\\sqrt{2}, \\sqrt{3}", "\\sqrt{2}")   # a list is not the answer


def test_answers_match_without_math_verify(monkeypatch):
    monkeypatch.setattr(R, "_math_verify", lambda: None)
    assert R.math_verify_equal("\\sqrt 2", "\\sqrt{2}") is None
    assert R.answers_match("$\\sqrt{2}$", "\\sqrt{2}")      # normalised strings
    assert not R.answers_match("\\sqrt 2", "\\sqrt{2}")     # ... which is all the fallback can do
    assert R.answers_match("18", "18.0")                    # numbers never needed math-verify


@pytest.mark.parametrize("text, answer", [
    ("<think>a</think><answer>42</answer>", "42"),
    ("<think>7 and 9</think>So it is \\boxed{16}.", "16"),
    ("<think>7 and 9</think>The answer is 16 apples", "16"),
    ("blah #### 1,000\n", "1,000"),
    ("no think block, the answer is 12.", "12"),
    ("we get 3 then 5, so <answer> $\\boxed{5}$ </answer>", "5"),
    ("<think>never closed but ends with 9", "9"),            # a model that ignores the tags just answers
    ("<think>x</think><answer>7", "7"),                       # unclosed final answer block
    ("<think>the answer is 8</think>nothing here", None),    # numbers in the reasoning are not the answer
    ("", None),
])
def test_extract_lenient(text, answer):
    assert R.extract_lenient(text) == answer


def test_last_boxed_nested():
    assert R.last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert R.last_boxed("\\boxed{\\frac{1}{2}") is None


def test_huge_exponents_are_refused_quickly():
    """A sampled answer like 1e99999999 must not make Fraction compute 10**99999999 (a GRPO step or eval stall)."""
    from nanoseek.tasks.rewards import parse_number

    assert parse_number("1e99999999") is None and parse_number("9" * 5000) is None  # would hang before
    assert parse_number("1e3") == 1000 and parse_number("2.5E-2") == parse_number("0.025")
