"""Small arithmetic and text helpers shared by every layer: sizes, rounding, safe text.

Nothing here knows about devices; everything is a pure function, tested on its own.
"""

from __future__ import annotations

import re


def ceil_div(n: int, d: int) -> int:
    """``n / d`` rounded up (for ``d > 0``)."""
    return -(-n // d)


def round_up(n: int, step: int) -> int:
    """The smallest multiple of ``step`` that is at least ``n``."""
    return ceil_div(n, step) * step


def round_down(n: int, step: int) -> int:
    """The largest multiple of ``step`` that is at most ``n``."""
    return n - n % step


def format_size(n: int) -> str:
    """``1073741824`` -> ``'1 GiB'``; exact where it can be, else one decimal."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


_SPEC_UNITS = (("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10))


def format_spec_size(n: int) -> str:
    """``2147483648`` -> ``'2G'``: a size as a spec writes it, in the largest unit that
    says it exactly (``spec.parse_size`` reads it back)."""
    for suffix, shift in _SPEC_UNITS:
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\t``, ``\\x1b``, ...), as ``ls``
    escapes file names: for text that comes from outside (a server's export names)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    return repr(ch)[1:-1] if ch != "'" else ch


_SIZE = re.compile(r"(\d+)\s*([kmgtp]?)(?:i?b)?", re.IGNORECASE)
_SHIFTS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}


def parse_bytes(text: str) -> int:
    """``'64M'`` -> 67108864 (binary units; ``64MiB`` and ``64m`` too); ``ValueError``
    for anything else.  For values written at run time (an xattr); specs and options
    parse theirs in ``spec``, with their own messages."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r} (a number with an optional K, M, G, T or P)")
    return int(m.group(1)) << _SHIFTS[m.group(2).lower()]
