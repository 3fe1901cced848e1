"""The values a spec's arguments take: paths, sizes, booleans, seconds, names of modes.

Each converter takes the argument's syntax node (and the compile options, which only
nested device specs use) and returns the value or raises ``SpecError`` saying why not.
"""

from __future__ import annotations

import os
from typing import Any

from ..devices.images import check_format
from ..devices.remote import MAX_TIMEOUT
from .grammar import Node, SpecError, Word, parse_bool, parse_size


def word(node: Node, what: str) -> str:
    if not isinstance(node, Word):
        raise SpecError(f"{what} must be a plain value, not {node.kind}(...)")
    return node.text


def existing_path(node: Node, options: Any) -> str:
    path = word(node, "a path")
    if not os.path.exists(path):
        raise SpecError(f"no such file: {path}")
    return path


def path_arg(node: Node, options: Any) -> str:
    return word(node, "a path")


def size_arg(node: Node, options: Any) -> int:
    return parse_size(word(node, "a size"))


def optional_size(node: Node, options: Any) -> int | None:
    return size_arg(node, options)


def sparse_size_arg(node: Node, options: Any) -> int | None:
    text = word(node, "a size")
    if text.strip().startswith("-"):
        raise SpecError(f"bad size {text!r}: a size cannot be negative")
    size = parse_size(text)
    if size == 0:
        raise SpecError(f"bad size {text!r}: a sparse image needs a size above 0")
    return size


def format_arg(node: Node, options: Any) -> str:
    """``format=raw``: the only image format blockfuse reads (others are refused)."""
    value = word(node, "a format").strip().lower()
    try:
        check_format(value)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    return value


def bool_arg(node: Node, options: Any) -> bool:
    return parse_bool(word(node, "a boolean"))


def state_path(node: Node, options: Any) -> str | None:
    """A file to keep state in: it may not exist yet, but its directory must."""
    path = word(node, "a state file")
    if os.path.isdir(path):
        raise SpecError(f"state file {path} is a directory")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise SpecError(f"the directory of state file {path} does not exist")
    return path


def uri_arg(node: Node, options: Any) -> str:
    return word(node, "an NBD URI")


def verify_arg(node: Node, options: Any) -> str:
    value = word(node, "verify").strip().lower()
    if value not in ("sample", "full"):
        raise SpecError(f"bad verify={value!r} (use sample, the default, or full)")
    return value


def timeout_arg(node: Node, options: Any) -> float:
    text = word(node, "a number of seconds")
    try:
        seconds = float(text)
    except ValueError:
        raise SpecError(f"bad timeout {text!r} (use seconds, e.g. timeout=10)") from None
    if not 0 < seconds <= MAX_TIMEOUT:
        raise SpecError(f"bad timeout {text!r}: use more than 0 and at most {MAX_TIMEOUT:g} s")
    return seconds
