"""The gate grammar: a condition on metrics, parsed (never evaluated as code) into a small tree.

    condition := sum ("<" | "<=" | ">" | ">=" | "==" | "!=") sum
    sum       := product (("+" | "-") product)*
    product   := unary (("*" | "/") unary)*
    unary     := "-" unary | NUMBER | REF | "(" sum ")"
    REF       := METRIC | OWNER "." METRIC      METRIC: name ("/" name)*, e.g. accuracy, heldout/accuracy

`OWNER` is `upstream` (the stage the model came from), an input's name (`teacher`) or an earlier stage's name.
A REF without an owner is the gated stage's own metric.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import NamedTuple, Union

_TOKEN = re.compile(r"\s*(?:(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
                    r"|(?P<ref>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?(?:/[A-Za-z_]\w*)*)"
                    r"|(?P<op><=|>=|==|!=|[<>+\-*/()]))")
COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}
_ARITH: dict[str, Callable[[float, float], float]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


class Ref(NamedTuple):
    owner: str | None  # None: the gated stage itself
    metric: str

    def __str__(self) -> str:
        return f"{self.owner}.{self.metric}" if self.owner else self.metric


class Op(NamedTuple):
    op: str  # + - * / or "neg"
    args: tuple[Expr, ...]


Expr = Union[float, Ref, Op]  # noqa: UP007 (a recursive alias)


class Condition(NamedTuple):
    left: Expr
    compare: str
    right: Expr
    text: str


class GateSyntaxError(ValueError):
    pass


def parse(text: str) -> Condition:
    """Raises GateSyntaxError saying what was expected where."""
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    stripped = text.rstrip()
    while pos < len(stripped):
        m = _TOKEN.match(stripped, pos)
        if m is None or m.end() == pos:
            raise GateSyntaxError(f"{text!r}: unexpected {stripped[pos:].strip()[:20]!r} at character {pos + 1}")
        kind = m.lastgroup
        assert kind is not None
        tokens.append((kind, m[kind], m.start(kind)))
        pos = m.end()
    parser = _Parser(text, tokens)
    left = parser.sum()
    compare = parser.take("op")
    if compare is None or compare not in COMPARE:
        raise parser.expected("a comparison (<, <=, >, >=, ==, !=)")
    right = parser.sum()
    if parser.i < len(tokens):
        raise parser.expected("the end of the condition")
    return Condition(left, compare, right, " ".join(text.split()))


class _Parser:
    def __init__(self, text: str, tokens: list[tuple[str, str, int]]) -> None:
        self.text, self.tokens, self.i = text, tokens, 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, kind: str, *values: str) -> str | None:
        token = self.peek()
        if token is None or token[0] != kind or (values and token[1] not in values):
            return None
        self.i += 1
        return token[1]

    def expected(self, what: str) -> GateSyntaxError:
        token = self.peek()
        where = f"got {token[1]!r} at character {token[2] + 1}" if token else "got the end"
        return GateSyntaxError(f"{self.text!r}: expected {what}, {where}")

    def sum(self) -> Expr:
        node = self.product()
        while (op := self.take("op", "+", "-")) is not None:
            node = Op(op, (node, self.product()))
        return node

    def product(self) -> Expr:
        node = self.unary()
        while (op := self.take("op", "*", "/")) is not None:
            node = Op(op, (node, self.unary()))
        return node

    def unary(self) -> Expr:
        if self.take("op", "-") is not None:
            return Op("neg", (self.unary(),))
        if (number := self.take("number")) is not None:
            return float(number)
        if (ref := self.take("ref")) is not None:
            owner, _, metric = ref.rpartition(".") if "." in ref.split("/")[0] else ("", "", ref)
            return Ref(owner or None, metric)
        if self.take("op", "(") is not None:
            node = self.sum()
            if self.take("op", ")") is None:
                raise self.expected("')'")
            return node
        raise self.expected("a number, a metric or '('")


def refs(expr: Expr | Condition) -> list[Ref]:
    """Every metric a condition (or expression) reads, in order."""
    if isinstance(expr, Condition):
        return refs(expr.left) + refs(expr.right)
    if isinstance(expr, Ref):
        return [expr]
    if isinstance(expr, Op):
        return [r for a in expr.args for r in refs(a)]
    return []


def value(expr: Expr, lookup: Callable[[Ref], float]) -> float:
    if isinstance(expr, Ref):
        return lookup(expr)
    if isinstance(expr, Op):
        if expr.op == "neg":
            return -value(expr.args[0], lookup)
        a, b = (value(x, lookup) for x in expr.args)
        if expr.op == "/" and b == 0:
            raise ZeroDivisionError(f"division by zero in {expr}")
        return _ARITH[expr.op](a, b)
    return expr
