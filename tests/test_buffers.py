"""Buffer lists cut at byte positions, without copies."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from blockfuse.buffers import advance, slice_views, split_buffers, split_views


@given(st.lists(st.binary(max_size=20), max_size=6), st.integers(0, 130), st.integers(0, 130))
def test_slices_are_the_bytes_of_the_whole(parts: list[bytes], a: int, b: int) -> None:
    whole = b"".join(parts)
    assert b"".join(slice_views(parts, a, b)) == whole[a:b]
    assert b"".join(advance(parts, a)) == whole[a:]
    head, rest = split_views(parts, a)
    assert (b"".join(head), b"".join(rest)) == (whole[:a], whole[a:])


def test_split_buffers_into_groups() -> None:
    groups = split_buffers([b"abcd", b"efgh"], [3, 2, 3])
    assert [b"".join(g) for g in groups] == [b"abc", b"de", b"fgh"]
