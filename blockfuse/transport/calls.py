"""One request on the wire, as the client keeps it until its reply is done."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from ..nbd.constants import Cmd
from ..nbd.events import Done


@dataclass(slots=True)
class Call:
    """One request on the wire; ``sink`` receives a READ's data."""

    cookie: int
    cmd: Cmd
    offset: int
    length: int
    deadline: float
    """``trio.current_time()`` by which the reply must be complete, or the connection is
    given up."""
    sink: memoryview | None = None
    done: trio.Event = field(default_factory=trio.Event)
    result: Done | None = None
    extents: list[tuple[int, int]] = field(default_factory=list)
    error: BaseException | None = None

    def describe(self) -> str:
        """``'a READ of 4096 bytes at 0'``, for messages."""
        if self.cmd in (Cmd.FLUSH, Cmd.DISC):
            return f"a {self.cmd.name}"
        return f"a {self.cmd.name} of {self.length} bytes at {self.offset}"


def split(offset: int, length: int, limit: int) -> list[tuple[int, int]]:
    """``(offset, length)`` pieces of at most ``limit`` bytes covering the range."""
    return [
        (off, min(limit, offset + length - off)) for off in range(offset, offset + length, limit)
    ]
