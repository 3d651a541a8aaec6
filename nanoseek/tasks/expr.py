"""Safe exact evaluation of small arithmetic expressions (`(25 - 5) * 3 / 4`), never with `eval()`.

Arithmetic computes its reference answers with it, and Countdown checks a model's equation with it. The text
must pass a character whitelist (digits, + - * /, parentheses, dots, spaces: TinyZero's filter) and a length
cap, then Python's own parser builds the tree and we walk it, allowing only + - * / on number literals.
Values are `Fraction`s, so `1 / 3 * 3` is exactly 1 and there is no float tolerance to argue about.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from fractions import Fraction

_ALLOWED = re.compile(r"^[\d+\-*/().\s]+$")
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


class ExprError(ValueError):
    """The text is not an allowed expression, or it divides by zero."""


@dataclass(frozen=True)
class Evaluated:
    value: Fraction
    numbers: tuple[Fraction, ...]  # every number literal, in the order written


def evaluate(text: str, *, max_len: int = 256, integers_only: bool = False,
             allow_unary: bool = True) -> Evaluated:
    """Value of `text` and the literals it used. integers_only rejects `2.5`; allow_unary=False rejects `-3`
    and `+3` (Countdown: a sign is an operation on no given number)."""
    if len(text) > max_len:
        raise ExprError(f"expression longer than {max_len} characters")
    if not _ALLOWED.match(text):
        raise ExprError("only digits, + - * / ( ) . and spaces are allowed")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ExprError(f"not an expression: {type(e).__name__}") from None
    numbers: list[Fraction] = []
    try:
        value = _walk(tree.body, numbers, integers_only, allow_unary)
    except RecursionError:
        raise ExprError("expression nested too deeply") from None
    return Evaluated(value, tuple(numbers))


def _walk(node: ast.AST, numbers: list[Fraction], integers_only: bool, allow_unary: bool) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if integers_only and type(node.value) is not int:
            raise ExprError(f"{node.value!r} is not an integer")
        # A float through its shortest repr, not its binary value: `0.1` is exactly 1/10.
        value = Fraction(node.value) if type(node.value) is int else Fraction(repr(node.value))
        numbers.append(value)
        return value
    if isinstance(node, ast.BinOp) and (type(node.op) in _BINARY or isinstance(node.op, ast.Div)):
        left = _walk(node.left, numbers, integers_only, allow_unary)
        right = _walk(node.right, numbers, integers_only, allow_unary)
        if isinstance(node.op, ast.Div):
            if right == 0:
                raise ExprError("division by zero")
            return left / right
        return _BINARY[type(node.op)](left, right)
    if allow_unary and isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _walk(node.operand, numbers, integers_only, allow_unary)
        return -value if isinstance(node.op, ast.USub) else value
    raise ExprError(f"{type(getattr(node, 'op', node)).__name__} is not allowed")
