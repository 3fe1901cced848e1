"""Device specs: the strings after ``--device NAME=`` turned into devices ready to open.

``grammar.py`` is the syntax (and sizes, booleans); ``binding.py`` matches a call's
arguments to a kind's typed record; ``kinds.py`` says what each kind means and compiles
a spec into a ``Recipe``; ``resized.py`` rewrites a spec for its device's new size.
"""

from ..units import format_spec_size
from .grammar import Call, Node, SpecError, Word, parse, parse_bool, parse_size, unparse
from .kinds import ARGUMENTS, KINDS, Options, Recipe, compile_spec, split_named
from .resized import resized_spec

__all__ = [
    "ARGUMENTS",
    "KINDS",
    "Call",
    "Node",
    "Options",
    "Recipe",
    "SpecError",
    "Word",
    "compile_spec",
    "format_spec_size",
    "parse",
    "parse_bool",
    "parse_size",
    "resized_spec",
    "split_named",
    "unparse",
]
