"""The shared arithmetic and text helpers."""

from __future__ import annotations

from blockfuse.units import ceil_div, format_size, printable, round_down, round_up


def test_rounding() -> None:
    assert [ceil_div(n, 512) for n in (0, 1, 512, 513)] == [0, 1, 1, 2]
    assert round_up(513, 512) == 1024 and round_down(1023, 512) == 512


def test_format_size() -> None:
    assert format_size(1 << 30) == "1 GiB"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(100) == "100 B"


def test_printable_escapes_control_characters_only() -> None:
    assert printable("disk0 ü") == "disk0 ü"
    assert printable("a\nb\tc\x1b[31m\0") == "a\\nb\\tc\\x1b[31m\\x00"
