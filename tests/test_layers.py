"""The layers of blockfuse: each module imports only from its own layer or those before it,
and the module import graph has no cycle (counting imports under TYPE_CHECKING too)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "blockfuse"

LAYERS = [
    ["errors", "log", "threads", "filerange"],
    ["block"],
    [
        "units",
        "buffers",
        "extents",
        "rangelock",
        "opening",
        "notify",
        "lifecycle",
        "malloc",
    ],
    ["sectors"],
    ["nbd"],
    ["transport"],
    ["devices"],
    ["swap"],
    ["spec"],
    ["fuse", "serve"],
    ["cli"],
    ["testing"],
]
"""In order: a layer may use the layers above it in this list, never those below."""

APART = [("fuse", "serve")]
"""Packages of one layer that must not use each other: the front ends."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The blockfuse modules ``path`` imports (absolute names)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.startswith("blockfuse"):
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("blockfuse"))
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in imports(p) if m in modules and m != name} for name, p in modules.items()
    }


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS: add it there")


def test_every_module_uses_only_layers_before_its_own() -> None:
    wrong = [
        f"{m} (layer {LAYERS[layer_of(m)]}) imports {n} (layer {LAYERS[layer_of(n)]})"
        for m, deps in graph().items()
        if m != "blockfuse"
        for n in deps
        if n != "blockfuse" and layer_of(n) > layer_of(m)
    ]
    assert not wrong, "\n".join(wrong)


def top(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_the_front_ends_do_not_use_each_other() -> None:
    wrong = [
        f"{m} imports {n}"
        for m, deps in graph().items()
        for n in deps
        for a, b in APART
        if {top(m), top(n)} == {a, b}
    ]
    assert not wrong, "\n".join(wrong)


def test_the_import_graph_has_no_cycle() -> None:
    edges = graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError(
                "import cycle: " + " -> ".join([*path[path.index(module) :], module])
            )
        if module in done:
            return
        for dep in edges.get(module, ()):
            if not dep.startswith(module + "."):  # a package re-exporting its own modules
                visit(dep, [*path, module])
        done.add(module)

    for module in edges:
        visit(module, [])
