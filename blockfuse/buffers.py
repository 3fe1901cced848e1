"""Lists of buffers as one run of bytes: views of parts of it, never copies.

A device call takes a list of buffers used one after another; the devices and the
front ends cut such lists at byte positions (a write in pieces, a read partly past a
file's end, a request split across units).  ``slice_views`` is the one primitive.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

from .block import Buffer, total_length


def byte_views(buffers: Sequence[Buffer]) -> list[memoryview]:
    """Each buffer as a flat view of bytes (``bytes``, ``bytearray`` and most views are
    one already: every request comes here, and a cast costs a new view)."""
    return [_flat(memoryview(b)) for b in buffers]


def _flat(view: memoryview) -> memoryview:
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def slice_views(buffers: Sequence[Buffer], start: int, end: int) -> list[memoryview]:
    """The bytes ``[start, end)`` of the concatenated ``buffers``, as views."""
    out, pos = [], 0
    for buf in buffers:
        view = memoryview(buf).cast("B")
        a, b = max(start - pos, 0), min(end - pos, len(view))
        if a < b:
            out.append(view if b - a == len(view) else view[a:b])
        pos += len(view)
        if pos >= end:
            break
    return out


def advance(views: Sequence[Buffer], n: int) -> list[memoryview]:
    """The views left after skipping the first ``n`` bytes."""
    return slice_views(views, n, total_length(views))


def split_views(views: Sequence[Buffer], n: int) -> tuple[list[memoryview], list[memoryview]]:
    """The first ``n`` bytes of ``views`` and the rest."""
    total = total_length(views)
    return slice_views(views, 0, min(n, total)), slice_views(views, n, total)


def split_buffers(buffers: Sequence[Buffer], lengths: Sequence[int]) -> list[list[memoryview]]:
    """Cut ``buffers`` into consecutive groups of ``lengths`` bytes."""
    ends = list(accumulate(lengths))
    starts = [0, *ends[:-1]]
    return [slice_views(buffers, a, b) for a, b in zip(starts, ends, strict=True)]
