"""A spec rewritten for its device's size after a resize (``truncate -s`` of a flat file),
so that what ``status`` and ``user.blockfuse.spec`` show opens the device as it is now:
``mem(1G)`` grown to 2 GiB reads ``mem(2G)``, ``sparse(./a.img, size=1G)`` reads
``sparse(./a.img, size=2G)``.

A kind whose argument record has a ``size`` field takes the new size there (where it was
written, positional or ``size=``, else added as ``size=``); a wrapper (``safe``) passes it
to its device; any other spec is left as it is.
"""

from __future__ import annotations

import dataclasses

from ..units import format_spec_size
from .grammar import Call, Node, SpecError, Word, parse, unparse
from .kinds import ARGUMENTS


def resized_spec(text: str, size_bytes: int) -> str:
    """``text`` (a spec as ``Recipe.text`` holds it) with its device now ``size_bytes``;
    text that is no spec is left as it is."""
    try:
        node = parse(text)
    except SpecError:
        return text
    resized = _resized(node, Word(format_spec_size(size_bytes)))
    return text if resized is node else unparse(resized)


def _resized(node: Node, size: Word) -> Node:
    if isinstance(node, Word) or node.kind not in ARGUMENTS:
        return node
    names = [f.name for f in dataclasses.fields(ARGUMENTS[node.kind])]
    if "size" in names:
        return _with_argument(node, names.index("size"), "size", size)
    if names == ["device"] and node.args:  # a wrapper
        inner = _resized(node.args[0], size)
        return node if inner is node.args[0] else Call(node.kind, (inner,), node.kwargs)
    return node


def _with_argument(call: Call, index: int, name: str, value: Node) -> Call:
    """``call`` with its argument ``name`` (at ``index`` when positional) set to ``value``."""
    if index < len(call.args):
        args = (*call.args[:index], value, *call.args[index + 1 :])
        return Call(call.kind, args, call.kwargs)
    kwargs = tuple((k, value if k == name else v) for k, v in call.kwargs)
    if all(k != name for k, _ in call.kwargs):
        kwargs += ((name, value),)
    return Call(call.kind, call.args, kwargs)
