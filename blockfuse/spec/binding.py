"""Matching a call's arguments to a kind's parameters: a typed record per kind.

A kind declares its arguments as a frozen dataclass whose fields say, in order, what
it takes; each field's ``metadata["convert"]`` turns the argument's syntax node (and the
compile options, for nested device specs) into the field's value, and a field without
a default is required::

    @dataclass(frozen=True)
    class FileArgs:
        path: str = arg(existing_path)
        ro: bool = arg(bool_arg, False)

    args = bind(call, FileArgs, options)   # FileArgs(path='./a.img', ro=False) or SpecError
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from .grammar import Call, Node, SpecError

T = TypeVar("T")
_REQUIRED = object()
Convert = Callable[[Node, Any], Any]


def arg(convert: Convert, default: Any = _REQUIRED) -> Any:
    """A parameter: how to convert its node, and its default (none: required)."""
    metadata = {"convert": convert}
    if default is _REQUIRED:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def bind(call: Call, record: type[T], options: object = None) -> T:
    """``call``'s arguments as a ``record``; raises ``SpecError`` naming the problem."""
    params = dataclasses.fields(record)  # type: ignore[arg-type]
    names = [p.name for p in params]
    if len(call.args) > len(params):
        most = f"{len(params)} argument{'' if len(params) == 1 else 's'}"
        raise SpecError(f"{call.kind}(...) takes at most {most}")
    given: dict[str, Node] = dict(zip(names, call.args, strict=False))
    for key, node in call.kwargs:
        if key not in names:
            raise SpecError(
                f"{call.kind}(...) has no argument '{key}' (it takes: {', '.join(sorted(names))})"
            )
        if key in given:
            raise SpecError(f"{call.kind}(...) got '{key}' twice")
        given[key] = node
    values = {}
    for p in params:
        if p.name in given:
            values[p.name] = p.metadata["convert"](given[p.name], options)
        elif p.default is dataclasses.MISSING:
            raise SpecError(f"{call.kind}(...) needs '{p.name}'")
    return record(**values)
