"""IntervalSet against a plain set of ints, driven by hypothesis."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from blockfuse.extents import IntervalSet, align_out

N = 64
ranges = st.tuples(st.integers(0, N), st.integers(0, N)).map(lambda t: (min(t), max(t)))
ops = st.lists(st.tuples(st.sampled_from(["add", "discard"]), ranges), max_size=40)


def as_set(s: IntervalSet) -> set[int]:
    return {i for a, b in s for i in range(a, b)}


def runs(points: set[int], start: int, end: int, inside: bool) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in range(start, end):
        if (i in points) == inside:
            if out and out[-1][1] == i:
                out[-1] = (out[-1][0], i + 1)
            else:
                out.append((i, i + 1))
    return out


@settings(max_examples=300, deadline=None)
@given(ops, ranges)
def test_matches_a_set_of_ints(
    operations: list[tuple[str, tuple[int, int]]], q: tuple[int, int]
) -> None:
    s = IntervalSet()
    model: set[int] = set()
    for op, (a, b) in operations:
        getattr(s, op)(a, b)
        if op == "add":
            model |= set(range(a, b))
        else:
            model -= set(range(a, b))
        assert as_set(s) == model
        assert s.total == len(model)
        intervals = s.to_list()
        assert all(a < b for a, b in intervals)
        assert all(x[1] < y[0] for x, y in itertools.pairwise(intervals))
    a, b = q
    assert s.covers(a, b) == all(i in model for i in range(a, b))
    assert s.overlaps(a, b) == any(i in model for i in range(a, b))
    assert s.intersection(a, b) == runs(model, a, b, True)
    assert s.gaps(a, b) == runs(model, a, b, False)
    assert s.first_gap(a, b) == (runs(model, a, b, False) or [None])[0]
    assert all((i in s) == (i in model) for i in range(-1, N + 2))
    assert s.copy() == s


def test_touching_intervals_coalesce() -> None:
    s = IntervalSet([(0, 4), (8, 12)])
    s.add(4, 8)
    assert s.to_list() == [(0, 12)] and len(s) == 1
    s.discard(2, 3)
    assert s.to_list() == [(0, 2), (3, 12)]


def test_align_out() -> None:
    assert align_out(3, 9, 4) == (0, 12)
    assert align_out(4, 8, 4) == (4, 8)


def test_a_terabyte_copied_in_order_is_one_interval() -> None:
    s = IntervalSet()
    chunk = 2048
    for i in range(0, 1 << 20, 1):
        s.add(i * chunk, (i + 1) * chunk)
    assert len(s) == 1 and s.total == (1 << 20) * chunk
