"""Structured reply chunks: which may belong to a request, and what their payloads say.

Each check runs on the 20-byte header, before any payload is waited for, so a length
that does not fit the request or the protocol's limit is refused without buffering it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ProtocolError
from .constants import (
    CHUNK_ERROR_BIT,
    ERROR_HEADER,
    EXTENT,
    HOLE,
    MAX_BLOCK_STATUS_CHUNK,
    MAX_ERROR_CHUNK,
    REPLY_FLAG_DONE,
    U32,
    U64,
    Chunk,
    Cmd,
    Errno,
)
from .coverage import Coverage
from .events import BlockStatus


def wire_errno(value: int) -> int:
    """An error value from the wire as an errno; values the spec does not allow are EINVAL."""
    return value if value in Errno._value2member_map_ else Errno.EINVAL


@dataclass(slots=True)
class Pending:
    cmd: Cmd
    offset: int
    length: int
    error: int = 0
    message: str = ""
    chunked: bool = False
    """A structured reply chunk arrived for it: no simple reply may end it then."""
    _coverage: Coverage | None = None
    _contexts: set[int] | None = None

    @property
    def coverage(self) -> Coverage:
        """What the reply's content chunks covered (made at the first: most replies to
        a lone request never need it)."""
        if self._coverage is None:
            self._coverage = Coverage()
        return self._coverage

    @property
    def contexts(self) -> set[int]:
        """Metadata contexts already answered (BLOCK_STATUS: one chunk per context)."""
        if self._contexts is None:
            self._contexts = set()
        return self._contexts


def check_chunk(pending: Pending, ctype: int, length: int, flags: int) -> None:
    """Refuse a chunk header whose type or length cannot belong to ``pending``."""
    what = f"chunk type {ctype} of {length} bytes for {pending.cmd.name}"
    if ctype == Chunk.NONE:
        ok = length == 0 and bool(flags & REPLY_FLAG_DONE)
    elif ctype == Chunk.OFFSET_DATA:
        ok = pending.cmd is Cmd.READ and 9 <= length <= pending.length + 8
    elif ctype == Chunk.OFFSET_HOLE:
        ok = pending.cmd is Cmd.READ and length == HOLE.size
    elif ctype == Chunk.BLOCK_STATUS:
        ok = pending.cmd is Cmd.BLOCK_STATUS and 12 <= length <= MAX_BLOCK_STATUS_CHUNK
        ok = ok and (length - 4) % EXTENT.size == 0
    elif ctype & CHUNK_ERROR_BIT:
        ok = ERROR_HEADER.size <= length <= MAX_ERROR_CHUNK
    else:
        raise ProtocolError(f"unknown non-error {what}")
    if not ok:
        raise ProtocolError(f"invalid {what}")


def claim(pending: Pending, offset: int, length: int, what: str) -> None:
    end = pending.offset + pending.length
    if length <= 0 or offset < pending.offset or offset + length > end:
        raise ProtocolError(
            f"{what} chunk [{offset}, {offset + length}) outside the request "
            f"[{pending.offset}, {end})"
        )
    pending.coverage.add(offset, offset + length)


def parse_block_status(pending: Pending, cookie: int, raw: bytes, known: set[int]) -> BlockStatus:
    """One BLOCK_STATUS chunk: a context we selected, answered at most once per request;
    all extents but the last end inside the request (the last may run past it)."""
    (context,) = U32.unpack(raw[:4])
    if context not in known or context in pending.contexts:
        raise ProtocolError(f"block status for context {context} that was not asked (again)")
    pending.contexts.add(context)
    extents = tuple(EXTENT.iter_unpack(raw[4:]))
    if any(length == 0 for length, _ in extents):
        raise ProtocolError("block status extent of length 0")
    before_last = sum(length for length, _ in extents[:-1])
    if before_last >= pending.length:
        raise ProtocolError(
            f"block status of {len(extents)} extents whose first {len(extents) - 1} cover "
            f"{before_last} bytes of a {pending.length}-byte request"
        )
    return BlockStatus(cookie, context, extents)


def check_block_status_done(pending: Pending, known: set[int]) -> None:
    """A successful BLOCK_STATUS reply has one status chunk per selected context."""
    missing = known - pending.contexts
    if pending.cmd is Cmd.BLOCK_STATUS and not pending.error and missing:
        raise ProtocolError(
            f"successful BLOCK_STATUS reply without a status chunk for context(s) {sorted(missing)}"
        )


def parse_error(pending: Pending, ctype: int, raw: bytes) -> tuple[int, str]:
    """An error chunk's errno and message; an ERROR_OFFSET must point into the request."""
    error, n = ERROR_HEADER.unpack(raw[: ERROR_HEADER.size])
    tail = 8 if ctype == Chunk.ERROR_OFFSET else 0
    if ERROR_HEADER.size + n + tail > len(raw):
        raise ProtocolError(f"error chunk message of {n} bytes in {len(raw)} bytes")
    if ctype in (Chunk.ERROR, Chunk.ERROR_OFFSET) and error == 0:
        raise ProtocolError("error chunk with error value 0")
    if ctype == Chunk.ERROR_OFFSET:
        at = ERROR_HEADER.size + n
        (offset,) = U64.unpack(raw[at : at + 8])
        check_error_offset(pending, offset)
    message = raw[ERROR_HEADER.size : ERROR_HEADER.size + n].decode("utf-8", errors="replace")
    return wire_errno(error) if error else Errno.EINVAL, message


def check_error_offset(pending: Pending, offset: int) -> None:
    end = pending.offset + pending.length
    if pending.length == 0 or not pending.offset <= offset < end:
        raise ProtocolError(
            f"error at offset {offset}, outside the {pending.cmd.name} request "
            f"[{pending.offset}, {end})"
        )
