"""The spec grammar and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockfuse.spec import Call, SpecError, Word, compile_spec, parse, parse_size, split_named


@pytest.mark.parametrize(
    ("text", "node"),
    [
        ("./disk.img", Word("./disk.img")),
        ("mem(1G)", Call("mem", (Word("1G"),))),
        ("safe(mem(1G))", Call("safe", (Call("mem", (Word("1G"),)),))),
        (
            'file("/a,b(c).img", ro=true)',
            Call("file", (Word("/a,b(c).img", quoted=True),), (("ro", Word("true")),)),
        ),
        (" safe( mem( 64K ) ) ", Call("safe", (Call("mem", (Word("64K"),)),))),
        ("nbd://host:10809/export", Word("nbd://host:10809/export")),
    ],
)
def test_parse(text: str, node: object) -> None:
    assert parse(text) == node


@pytest.mark.parametrize(
    ("text", "size"),
    [("512", 512), ("64K", 65536), ("256M", 256 << 20), ("1G", 1 << 30), ("1T", 1 << 40),
     ("2GiB", 2 << 30), ("1g", 1 << 30)],
)  # fmt: skip
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mem(1X)", "bad size '1X'"),
        ("mem(-1)", "bad size '-1'"),
        ("mem(100)", "not a whole number of 512-byte sectors"),
        ("mem(0)", "needs a size above 0"),
        ("foo(1)", "unknown device kind 'foo'"),
        ("mem(", "expected a device spec at character 5"),
        ("mem(1G", "expected ',' or ')' in mem(...)"),
        ("mem(1G) x", "unexpected 'x'"),
        ("safe(mem(1G), x=1)", "safe(...) has no argument 'x' (it takes: device)"),
        ("safe(mem(1G), mem(1G))", "safe(...) takes at most 1 argument"),
        ("safe(mem(1G), device=mem(1G))", "got 'device' twice"),
        ("mem()", "mem(...) needs 'size'"),
        ("file(ro=true)", "file(...) needs 'path'"),
        ("file(/no/such/file)", "no such file: /no/such/file"),
        ("/no/such/file", "no such file: /no/such/file"),
        ("file('unterminated)", "unterminated quoted string"),
        ("file(x, ro=maybe)", "no such file"),
        ("mem(size=mem(1G))", "a size must be a plain value"),
    ],
)
def test_errors_name_spec_and_problem(text: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        compile_spec(text)
    assert f"bad device spec {text!r}" in str(info.value)
    assert message in str(info.value)


def test_bad_boolean(tmp_path: Path) -> None:
    img = tmp_path / "x.img"
    img.write_bytes(bytes(512))
    with pytest.raises(SpecError, match="bad boolean 'maybe'"):
        compile_spec(f"file({img}, ro=maybe)")


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="is a directory"):
        compile_spec(str(tmp_path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("disk", "expected NAME=SPEC"),
        ("a/b=mem(1M)", "must be a file name"),
        ("=mem(1M)", "must be a file name"),
    ],
)
def test_named_device_errors(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        split_named(text)
