"""The spec grammar: the strings after ``--device NAME=`` as syntax trees and values.

Grammar (calls nest; arguments are positional or ``key=value``)::

    spec  := call | word
    call  := KIND "(" [arg ("," arg)*] ")"
    arg   := [KEY "="] spec
    word  := quoted string | bare text up to the next "," or ")" outside quotes

Pure functions on strings; what the kinds mean is ``kinds.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class SpecError(ValueError):
    """A spec that cannot be used; the message says what is wrong with it."""


# --- syntax ------------------------------------------------------------------------


@dataclass(frozen=True)
class Word:
    text: str
    quoted: bool = False


@dataclass(frozen=True)
class Call:
    kind: str
    args: tuple[Node, ...] = ()
    kwargs: tuple[tuple[str, Node], ...] = ()


Node = Word | Call

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, problem: str, hint: str = "") -> SpecError:
        return SpecError(f"{problem} at character {self.pos + 1}{hint}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_spaces(self) -> None:
        while self.peek().isspace():
            self.pos += 1

    def parse_spec(self) -> Node:
        self.skip_spaces()
        if self.peek() in ("'", '"'):
            return Word(self.parse_quoted(), quoted=True)
        m = _IDENT.match(self.text, self.pos)
        if m and self.text[m.end() : m.end() + 1] == "(":
            self.pos = m.end() + 1
            return self.parse_call(m.group())
        return self.parse_bare()

    def parse_quoted(self) -> str:
        quote, start = self.peek(), self.pos
        self.pos += 1
        out = []
        while (c := self.peek()) != quote:
            if not c:
                self.pos = start
                raise self.fail("unterminated quoted string")
            if c == "\\":
                self.pos += 1
                c = self.peek()
            out.append(c)
            self.pos += 1
        self.pos += 1
        return "".join(out)

    def parse_bare(self) -> Word:
        start = self.pos
        while self.peek() and self.peek() not in ",()":
            self.pos += 1
        text = self.text[start : self.pos].strip()
        if not text:
            raise self.fail("expected a device spec")
        return Word(text)

    def parse_call(self, kind: str) -> Call:
        args: list[Node] = []
        kwargs: list[tuple[str, Node]] = []
        self.skip_spaces()
        if self.peek() == ")":
            self.pos += 1
            return Call(kind)
        while True:
            self.parse_arg(kind, args, kwargs)
            self.skip_spaces()
            c = self.peek()
            self.pos += 1
            if c == ")":
                return Call(kind, tuple(args), tuple(kwargs))
            if c != ",":
                self.pos -= 1
                hint = f"; {QUOTE_HINT}" if c == "(" else ""
                raise self.fail(f"expected ',' or ')' in {kind}(...)", hint)

    def parse_arg(self, kind: str, args: list[Node], kwargs: list[tuple[str, Node]]) -> None:
        self.skip_spaces()
        m = _IDENT.match(self.text, self.pos)
        if m and self.text[m.end() : m.end() + 1] == "=":
            self.pos = m.end() + 1
            if any(k == m.group() for k, _ in kwargs):
                raise self.fail(f"{kind}(...) names '{m.group()}' twice")
            kwargs.append((m.group(), self.parse_spec()))
            return
        if kwargs:
            raise self.fail(f"positional argument after key=value in {kind}(...)")
        args.append(self.parse_spec())


QUOTE_HINT = "quote a path that holds ',' or parentheses"


def parse(text: str) -> Node:
    """Parse a spec into its syntax tree; raises ``SpecError``."""
    p = _Parser(text)
    node = p.parse_spec()
    p.skip_spaces()
    if p.pos != len(text):
        cut = isinstance(node, Word) and not node.quoted and text[p.pos] in ",()"
        hint = f"; {QUOTE_HINT}: file({quoted(text.strip())})" if cut else ""
        raise p.fail(f"unexpected {text[p.pos]!r}", hint)
    return node


def quoted(text: str) -> str:
    """``text`` as a quoted word of the grammar (``parse`` reads it back as ``text``)."""
    escaped = text.replace("\\", "\\\\")
    if '"' not in text:
        return f'"{escaped}"'
    return "'" + escaped.replace("'", "\\'") + "'"


# --- values ------------------------------------------------------------------------

_SIZE = re.compile(r"(\d+)\s*([KMGTP]?)(i?B)?", re.IGNORECASE)
_SHIFTS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}


def parse_size(text: str) -> int:
    """``'512'`` -> 512, ``'64K'`` -> 65536, ``'1G'``/``'1GiB'`` -> 2**30 (binary units)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise SpecError(f"bad size {text!r} (use a number with an optional K, M, G, T or P)")
    return int(m.group(1)) << _SHIFTS[m.group(2).upper()]


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise SpecError(f"bad boolean {text!r} (use true or false)")


def unparse(node: Node) -> str:
    """The spec text of ``node`` (normalised: no extra spaces)."""
    if isinstance(node, Word):
        return repr(node.text) if node.quoted else node.text
    parts = [unparse(a) for a in node.args] + [f"{k}={unparse(v)}" for k, v in node.kwargs]
    return f"{node.kind}({', '.join(parts)})"
