"""Device specs: the strings after ``--device NAME=`` turned into devices ready to open.

``grammar.py`` is the syntax (and sizes, booleans); ``binding.py`` matches a call's
arguments to a kind's typed record; ``kinds.py`` says what each kind means and compiles
a spec into a ``Recipe``.
"""

from .grammar import Call, Node, SpecError, Word, parse, parse_bool, parse_size, unparse
from .kinds import KINDS, Options, Recipe, compile_spec, split_named

__all__ = [
    "KINDS",
    "Call",
    "Node",
    "Options",
    "Recipe",
    "SpecError",
    "Word",
    "compile_spec",
    "parse",
    "parse_bool",
    "parse_size",
    "split_named",
    "unparse",
]
