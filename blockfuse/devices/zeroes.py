"""Zero blocks in a write: which pieces of a buffer are all zeroes (pure functions).

The ``sparse`` device never writes a block of zeroes: it punches or skips it, so that a
file stays sparse however it is written (mkfs zeroing its tables, ``dd if=/dev/zero``).
A write is cut where the *file's* blocks start, and each piece is zero or data whole::

    file blocks   |   block 7   |   block 8   |   block 9   |  block 10   |
    a write            [ dd 00 00 | 00 00 00 00 | 00 00 00 00 | 00 dd ]
    runs               [ data     ][ zero: blocks 8 and 9     ][ data  ]

A partial piece at an edge of the write that is all zeroes is a zero piece too
(punching part of a block zeroes that part in place).

Checking costs one byte per block for data (gathered by one strided slice), and a full
compare only for blocks that start with a zero byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BLOCK = 4096
"""Zero detection works on the file's blocks of this size (ext4, xfs, btrfs: 4 KiB)."""

ZERO_BLOCK = bytes(BLOCK)
ZEROES = memoryview(bytes(1 << 20))


@dataclass(slots=True)
class Run:
    """A stretch of a write at byte ``offset``: all zeroes, or data to write."""

    offset: int
    zero: bool
    views: list[memoryview] = field(default_factory=list)
    length: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length

    def add(self, piece: memoryview) -> None:
        self.views.append(piece)
        self.length += len(piece)


def is_zero(view: memoryview) -> bool:
    return view.tobytes() == ZERO_BLOCK[: len(view)]


def zero_pieces(offset: int, view: memoryview) -> list[tuple[int, int]]:
    """``(start, stop)`` of the all-zero pieces of ``view`` (at file ``offset``), cut at the
    file's block boundaries, neighbours merged.

    Only a piece whose first byte is zero is compared in full, and the first bytes are
    gathered by one strided slice, so 128 KiB of data is scanned in well under 1 µs.
    """
    if not view:
        return []
    head = -offset % BLOCK
    firsts = view[head::BLOCK].tobytes()
    if 0 not in firsts and (not head or view[0]):
        return []
    starts = [0] if head and not view[0] else []
    i = firsts.find(0)
    while i >= 0:
        starts.append(head + i * BLOCK)
        i = firsts.find(0, i + 1)
    pieces: list[tuple[int, int]] = []
    for start in starts:
        stop = min(len(view), head if start < head else start + BLOCK)
        if not is_zero(view[start:stop]):
            continue
        if pieces and pieces[-1][1] == start:
            start = pieces.pop()[0]
        pieces.append((start, stop))
    return pieces


def zero_runs(offset: int, views: list[memoryview]) -> list[Run]:
    """A write split into alternating zero and data runs, in order."""
    runs: list[Run] = []
    for view in views:
        pos = 0
        for start, stop in zero_pieces(offset, view):
            if start > pos:
                _add_piece(runs, offset + pos, False, view[pos:start])
            _add_piece(runs, offset + start, True, view[start:stop])
            pos = stop
        if pos < len(view):
            _add_piece(runs, offset + pos, False, view[pos:] if pos else view)
        offset += len(view)
    return runs


def _add_piece(runs: list[Run], at: int, zero: bool, piece: memoryview) -> None:
    if not runs or runs[-1].zero != zero:
        runs.append(Run(at, zero))
    runs[-1].add(piece)


def data_end(runs: list[Run]) -> int:
    """Where the last data run ends (0 if the write is all zeroes)."""
    for run in reversed(runs):
        if not run.zero:
            return run.end
    return 0


def fill_zeroes(views: list[memoryview]) -> None:
    for v in views:
        for start in range(0, len(v), len(ZEROES)):
            n = min(len(ZEROES), len(v) - start)
            v[start : start + n] = ZEROES[:n]
