"""Rule-based reward pieces shared by every task: the response format, answer extraction, numeric and LaTeX
answer equivalence, and the length penalty.

The format is R1's (DeepSeek-R1 §2.2.1, Table 1): one `<think>…</think>` block, then one `<answer>…</answer>`
block, then nothing. Accuracy is only ever granted to a well-formed response (`parse_response`), so the
format bonus and the accuracy reward cannot be collected separately by a response that games one of them:
an answer hidden in the reasoning, a second think or answer block, text after the answer, an empty
reasoning or an empty answer all make the response malformed (open-r1 PR #418 and open-instruct PR #659
describe the hacks this shuts out).

`extract_lenient` is the other reading, for evaluation only: it finds a final answer in any reasonable
spelling (answer tags, `\\boxed{}`, `#### N`, the last number) so a model that never learned the tags still
gets an honest accuracy; evaluation reports both readings.
"""

from __future__ import annotations

import functools
import re
import threading
import warnings
from dataclasses import dataclass
from fractions import Fraction

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
_SHAPE = re.compile(r"\A\s*<think>(?P<reasoning>.*)</think>\s*<answer>(?P<answer>.*)</answer>\s*\Z", re.DOTALL)


# ---------------------------------------------------------------------------------------------------------
# Format


@dataclass(frozen=True)
class ParsedResponse:
    ok: bool
    answer: str | None        # the answer block's text (stripped), when ok
    reasoning: str | None     # the think block's text, when ok
    problem: str = ""         # why it is malformed, for logs and tests


def full_response(completion: str, started_in_think: bool) -> str:
    """The assistant's whole text: when the prompt already opened `<think>`, the completion starts inside it."""
    return THINK_OPEN + completion if started_in_think else completion


def parse_response(completion: str, *, started_in_think: bool = False, min_think_chars: int = 1) -> ParsedResponse:
    """Strict R1 format check. Exactly one of each tag, in the order think, /think, answer, /answer, with only
    whitespace before the think block, between the blocks and after the answer; the reasoning must hold at
    least `min_think_chars` non-space characters and the answer at least one."""
    text = full_response(completion, started_in_think)
    for tag in _TAGS:
        n = text.count(tag)
        if n != 1:
            return _bad(f"{tag} appears {n} times (exactly once is required)")
    m = _SHAPE.match(text)
    if m is None:
        return _bad("tags out of order, or text before <think> or after </answer>, or between the blocks")
    reasoning, answer = m["reasoning"], m["answer"].strip()
    if len("".join(reasoning.split())) < min_think_chars:
        return _bad("empty reasoning")
    if not answer:
        return _bad("empty answer")
    return ParsedResponse(True, answer, reasoning)


def _bad(why: str) -> ParsedResponse:
    return ParsedResponse(False, None, None, why)


# ---------------------------------------------------------------------------------------------------------
# Lenient extraction (evaluation)


def extract_lenient(completion: str, *, last_number: bool = True) -> str | None:
    """The final answer, read generously (lm-eval's "flexible extract" spirit): from the text after the last
    `</think>` (all of it when the think block was never closed — a model that ignores the tags just
    answers), the last `<answer>` block (also one left unclosed at the end), else the last `\\boxed{}`, else
    `#### N`, else (numeric tasks) the last number; None when there is none of these."""
    text = completion
    if THINK_CLOSE in text:
        text = text.rsplit(THINK_CLOSE, 1)[1]
    if ANSWER_OPEN in text:
        inner = text.rsplit(ANSWER_OPEN, 1)[1].split(ANSWER_CLOSE, 1)[0].strip()
        if inner:
            return strip_wrappers(inner)
    boxed = last_boxed(text)
    if boxed:
        return boxed.strip()
    hashes = re.findall(r"####\s*([^\n]+)", text)
    if hashes and hashes[-1].strip():
        return hashes[-1].strip()
    if last_number:
        nums = re.findall(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?", text)
        if nums:
            return nums[-1].rstrip(",")
    return None


def last_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if there is none or it
    is never closed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def strip_wrappers(answer: str) -> str:
    """`$\\boxed{12}$` → `12`: the math delimiters and box a model may put around an answer."""
    s = answer.strip()
    for _ in range(3):
        before = s
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$").strip()
        elif s.startswith("\\(") and s.endswith("\\)"):
            s = s[2:-2].strip()
        elif s.startswith("\\[") and s.endswith("\\]"):
            s = s[2:-2].strip()
        boxed = last_boxed(s)
        if boxed is not None and s.startswith(("\\boxed{", "\\fbox{")) and s.endswith("}"):
            s = boxed.strip()
        if s == before:
            break
    return s


# ---------------------------------------------------------------------------------------------------------
# Numeric equivalence

_PLAIN = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_GROUPED = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_RATIO = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")
_LATEX_FRAC = re.compile(r"([+-]?)\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}")
_CURRENCY = ("\\$", "$", "€", "£", "USD", "usd")


def parse_number(text: str) -> Fraction | None:
    """A number in the ways answers get written, exactly: `1,234` (valid thousands grouping only), `1234.0`,
    `$12`, `12%`, `12.`, `3/4`, `\\frac{3}{4}`, `1e3`, wrapped in `$…$` or `\\boxed{}` or not. None for
    anything else, including hedges like `12 or 13` and malformed groupings like `1,23`."""
    s = strip_wrappers(text).replace("\\!", "").replace("{,}", ",")
    s = s.strip().rstrip(".").strip()
    if s.endswith("\\%") or s.endswith("%"):
        s = s.removesuffix("%").removesuffix("\\").strip()
    sign = ""
    if s and s[0] in "+-":
        sign, s = s[0], s[1:].lstrip()
    for c in _CURRENCY:
        if s.startswith(c):
            s = s[len(c):].strip()
            break
    if s and s[0] in "+-" and not sign:   # "$-5" as well as "-$5"
        sign, s = s[0], s[1:].lstrip()
    if not s or s[0] in "+-":
        return None
    s = sign + s
    if _GROUPED.fullmatch(s):
        s = s.replace(",", "")
    if _PLAIN.fullmatch(s):
        # Fraction("1e99999999") computes 10**99999999 (minutes of CPU): a sampled answer must not stall
        # a GRPO step or an eval, and no real answer needs an exponent past ±1000 or a 1000-digit mantissa.
        mantissa, _, exp = s.lower().partition("e")
        if (exp and abs(int(exp)) > 1000) or len(mantissa) > 1000:
            return None
        return Fraction(s)
    m = _RATIO.fullmatch(s)
    if m and int(m[2]) != 0:
        return Fraction(int(m[1]), int(m[2]))
    m = _LATEX_FRAC.fullmatch(s)
    if m and int(m[3]) != 0:
        value = Fraction(int(m[2]), int(m[3]))
        return -value if m[1] == "-" else value
    return None


def format_number(value: Fraction) -> str:
    """Canonical text of an exact number: `12`, `-7/2`."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def answers_match(pred: str, gold: str) -> bool:
    """Is a predicted answer equivalent to the reference? A numeric reference needs a numeric prediction
    of exactly the same value (no math-verify there: its lenient extraction would pull `12` out of
    `12 or 13`). Anything else goes to math-verify when it is installed, else to a normalised string
    comparison."""
    g = parse_number(gold)
    if g is not None:
        p = parse_number(pred)
        return p is not None and p == g
    verdict = math_verify_equal(pred, gold)
    if verdict is not None:
        return verdict
    return _normalise(pred) == _normalise(gold)


def _normalise(s: str) -> str:
    return "".join(strip_wrappers(s).split()).lower()


@functools.lru_cache(maxsize=1)
def _math_verify():
    """The math_verify module, or None (warned once) when it is not installed."""
    try:
        import math_verify
    except ImportError:
        warnings.warn("math-verify is not installed: LaTeX answers are compared as normalised strings "
                      "(pip install math-verify==0.9.0 for symbolic equivalence)", stacklevel=3)
        return None
    return math_verify


def math_verify_equal(pred: str, gold: str) -> bool | None:
    """Symbolic equivalence of two LaTeX answers through math-verify; None when it is not installed.

    Both sides are wrapped in `$…$` (bare LaTeX like `\\sqrt 2` is otherwise misread) and the prediction is
    parsed in first-match mode, so a list of candidates is one set-valued answer, not several chances."""
    mv = _math_verify()
    if mv is None:
        return None
    # math-verify's timeouts use SIGALRM, which exists only on the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_p = mv.parse(_dollars(gold), parsing_timeout=timeout)
    pred_p = mv.parse(_dollars(pred), extraction_mode="first_match", parsing_timeout=timeout)
    if not gold_p or not pred_p:
        return False
    return bool(mv.verify(gold_p, pred_p, timeout_seconds=timeout))


def _dollars(s: str) -> str:
    s = strip_wrappers(s)
    return s if "$" in s else f"${s}$"


# ---------------------------------------------------------------------------------------------------------
# Length


def overlong_penalty(num_tokens: int, max_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13): 0 up to max_tokens − buffer, then a
    linear ramp down to −1 at max_tokens, and −1 beyond."""
    if num_tokens > max_tokens:
        return -1.0
    start = max_tokens - buffer
    if buffer <= 0 or num_tokens <= start:
        return 0.0
    return (start - num_tokens) / buffer
