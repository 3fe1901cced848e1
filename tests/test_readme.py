"""The README and ``--help`` say what the parser does: the same device kinds (aliases
too), each with the same arguments; the same size units; the same global options and
default device (issue 17)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from blockfuse.cli import log_level, parse_args
from blockfuse.cli.devices import DEFAULT_DEVICE, SPEC_HELP, default_device
from blockfuse.spec import ARGUMENTS, KINDS, parse_size
from blockfuse.spec.grammar import _SHIFTS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
CALL = re.compile(r"\b([a-z]+)\(([^()`]*(?:\([^()`]*\)[^()`]*)*)\)")
"""A call as documentation writes one: ``kind(ARG, key=VALUE)`` (one level of nesting)."""


def section(title: str) -> str:
    start = README.index(title)
    end = README.index("\n#", start + len(title))
    return README[start:end]


def signatures(text: str) -> dict[str, tuple[int, set[str]]]:
    """``kind -> (positional placeholders, keywords)`` of every ``kind(...)`` in ``text``
    written with placeholders (``mem(SIZE)``, not an example like ``mem(1G)``)."""
    out: dict[str, tuple[int, set[str]]] = {}
    for kind, inside in CALL.findall(text):
        args = [a.strip() for a in inside.split(",") if a.strip()]
        positional = [a for a in args if "=" not in a]
        if not all(a.isupper() or a.startswith(("PATH", "URI")) for a in positional):
            continue  # an example, not a signature
        keywords = {a.split("=")[0] for a in args if "=" in a}
        out[kind] = (len(positional), keywords)
    return out


def parser_signature(kind: str) -> tuple[int, set[str]]:
    fields = dataclasses.fields(ARGUMENTS[kind])
    required = [f for f in fields if f.default is dataclasses.MISSING]
    return len(required), {f.name for f in fields if f.default is not dataclasses.MISSING}


def test_the_readme_table_lists_every_kind_with_its_arguments() -> None:
    table = "\n".join(
        line for line in section("### Device specs").splitlines() if line.startswith("| `")
    )
    documented = signatures(table)
    assert set(documented) == set(KINDS), "README table vs spec.KINDS"
    for kind, signature in documented.items():
        assert signature == parser_signature(kind), kind


def test_help_lists_every_kind_with_its_arguments() -> None:
    documented = signatures(SPEC_HELP)
    assert set(documented) == set(KINDS), "mount --help vs spec.KINDS"
    for kind, signature in documented.items():
        assert signature == parser_signature(kind), kind


def test_every_size_unit_is_documented_and_means_what_it_says() -> None:
    units = {u for u in _SHIFTS if u}
    text = section("### Device specs")
    documented = set(re.findall(r"`\d+([KMGTP])`", text))
    assert documented == units
    assert "256 MiB (268435456 bytes)" in text
    for spelling in ("256M", "256m", "256MB", "256MiB"):
        assert f"`{spelling}`" in text and parse_size(spelling) == 268435456
    assert "binary units" in SPEC_HELP and all(f"1{u}" in SPEC_HELP for u in "TP")


def test_the_synopsis_shows_the_global_options_and_the_short_device_option() -> None:
    synopsis = README[README.index("## Using it") : README.index("`mount` runs")]
    assert "blockfuse [-v] COMMAND" in synopsis and "blockfuse --version" in synopsis
    assert synopsis.count("[-d|--device NAME=SPEC]") == 2


@pytest.mark.parametrize(
    "argv",
    [["-v", "mount", "mnt"], ["mount", "-v", "mnt"], ["mount", "mnt", "--verbose"],
     ["status", "mnt", "-v"], ["umount", "-v", "mnt"], ["ls", "-v", "nbd://h/"],
     ["serve", "-v"], ["pivot", "-v", "mnt/disk"]],
)  # fmt: skip
def test_v_works_before_and_after_the_subcommand(argv: list[str]) -> None:
    assert log_level(parse_args(argv)) == "debug"


def test_without_v_there_is_no_debug_detail() -> None:
    assert log_level(parse_args(["mount", "mnt"])) == "info"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("blockfuse ")


def test_the_default_device_is_said_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_device() == DEFAULT_DEVICE == "disk=sparse(blockfuse-disk.img, size=1G)"
    assert f"`{DEFAULT_DEVICE}`" in README.replace("\n", " ")
    with pytest.raises(SystemExit):
        parse_args(["mount", "--help"])
    assert DEFAULT_DEVICE in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


def test_the_readme_lists_the_layers_in_the_order_the_code_keeps() -> None:
    from .test_layers import LAYERS

    text = README[README.index("Layout (see the module docstrings") :]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    listed = [
        [
            name.split("/")[0].removesuffix(".py")
            for name in re.findall(r"`([^`]+)`", row.split(" | ")[0])
        ]
        for row in rows
    ]
    assert listed == LAYERS
