"""`given:` expressions: a task path, `~` (not), `&` (and), parentheses. Parsed by hand, never evaluated as Python.

Grammar (`~` binds tighter than `&`)::

    expr  := unary ("&" unary)*
    unary := "~" unary | "(" expr ")" | NAME
    NAME  := [A-Za-z_][A-Za-z0-9_]* ("." [A-Za-z_][A-Za-z0-9_]*)*

Evaluation is three-valued (Kleene): a reference to task `p` is true where p's label is known, p applies and p is
true; false where p's label is known, p applies and p is false; unknown everywhere else. `~` swaps true and false and
leaves unknown alone, `&` is false if either side is false. A condition holds only where it is true, so an unknown
never becomes true.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)|(?P<op>[~&()]))")


class ConditionSyntaxError(ValueError):
    """A `given:` expression does not parse."""


@dataclass(frozen=True)
class Ref:
    """A reference to a binary task by path."""

    path: str


@dataclass(frozen=True)
class Not:
    operand: Condition


@dataclass(frozen=True)
class And:
    left: Condition
    right: Condition


Condition = Ref | Not | And


def parse(text: str) -> Condition:
    """Parse a `given:` expression; raise ConditionSyntaxError with the position of the problem."""
    if not isinstance(text, str) or not text.strip():
        raise ConditionSyntaxError(f"expected an expression, got {text!r}")
    tokens = _tokenize(text)
    parser = _Parser(tokens, text)
    cond = parser.expr()
    if parser.pos != len(tokens):
        raise ConditionSyntaxError(f"unexpected {tokens[parser.pos]!r} in {text!r}")
    return cond


def names(cond: Condition) -> list[str]:
    """The task paths a condition refers to, in order of appearance, without repeats."""
    out: list[str] = []

    def walk(c: Condition) -> None:
        if isinstance(c, Ref):
            if c.path not in out:
                out.append(c.path)
        elif isinstance(c, Not):
            walk(c.operand)
        else:
            walk(c.left)
            walk(c.right)

    walk(cond)
    return out


def evaluate(
    cond: Condition, ref: Callable[[str], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(true, false) bool masks of a condition; `ref(path)` gives them for one task. Neither mask = unknown."""
    if isinstance(cond, Ref):
        return ref(cond.path)
    if isinstance(cond, Not):
        true, false = evaluate(cond.operand, ref)
        return false, true
    lt, lf = evaluate(cond.left, ref)
    rt, rf = evaluate(cond.right, ref)
    return lt & rt, lf | rf


def to_text(cond: Condition) -> str:
    """A canonical text form (round-trips through `parse`)."""
    if isinstance(cond, Ref):
        return cond.path
    if isinstance(cond, Not):
        inner = to_text(cond.operand)
        return f"~{inner}" if isinstance(cond.operand, Ref | Not) else f"~({inner})"
    return f"{to_text(cond.left)} & {to_text(cond.right)}"


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None:
            bad = text[pos:].lstrip()[0]
            raise ConditionSyntaxError(f"unexpected character {bad!r} in {text!r}")
        tokens.append(m.group("name") or m.group("op"))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[str], text: str) -> None:
        self.tokens, self.text, self.pos = tokens, text, 0

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expr(self) -> Condition:
        cond = self.unary()
        while self._peek() == "&":
            self.pos += 1
            cond = And(cond, self.unary())
        return cond

    def unary(self) -> Condition:
        tok = self._peek()
        if tok is None:
            raise ConditionSyntaxError(f"unexpected end of {self.text!r}")
        self.pos += 1
        if tok == "~":
            return Not(self.unary())
        if tok == "(":
            cond = self.expr()
            if self._peek() != ")":
                raise ConditionSyntaxError(f"missing ')' in {self.text!r}")
            self.pos += 1
            return cond
        if tok in ("&", ")"):
            raise ConditionSyntaxError(f"unexpected {tok!r} in {self.text!r}")
        return Ref(tok)
