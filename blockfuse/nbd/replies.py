"""The server's side of transmission: which requests it refuses by itself, and the bytes
of its replies.

``refusal`` checks a request against what the server advertised: an unknown command or
flag (EINVAL), a write, trim or zero on a read-only export (EPERM), a command or flag
not offered (EINVAL), a range past the end (ENOSPC for writes, EINVAL for the rest), a
zero length or a payload over the maximum (EINVAL).  A request it passes is
one the device may be asked to do; the checks are cheap and run once per request.

``encode`` turns a reply into the parts to write, data as zero-copy views::

    simple:      [magic, error, cookie] [READ data ...]
    structured:  [magic, flags, type, cookie, length] [payload]  x  one or more chunks,
                 DONE on the last; READ pieces become OFFSET_DATA / OFFSET_HOLE chunks

Successful replies to anything but READ and BLOCK_STATUS stay simple (16 bytes; the
spec allows it on structured connections), errors there go in an ERROR chunk with their
message.  Error values outside the eight the spec allows go out as EIO.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..filerange import FileRange
from .constants import (
    CHUNK_HEADER,
    DATA_CHUNK_HEADER,
    ERROR_HEADER,
    EXTENT,
    HOLE,
    KNOWN_CMD_FLAGS,
    MAX_STRING,
    REPLY_FLAG_DONE,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    U32,
    U64,
    Chunk,
    Cmd,
    CmdFlag,
    Errno,
)
from .events import ExportInfo, ReadReply, ServerReply, StatusReply
from .transmission import FLAG_COMMANDS, FLAG_NEEDS, NEEDS_FLAG, WRITES

Part = bytes | bytearray | memoryview | FileRange
"""A part of a message: bytes, or a file's range that the transport sends from the file."""

ALLOCATION_ID = 1
"""The id this server gives ``base:allocation`` (opaque to the client; qemu-nbd uses 0,
nbdkit 1)."""

PAYLOAD_COMMANDS = frozenset({int(Cmd.READ), int(Cmd.WRITE)})
GROWING = frozenset({int(Cmd.WRITE), int(Cmd.WRITE_ZEROES)})
"""Past the end, these are ENOSPC (a write that cannot fit), the rest EINVAL."""
FLUSH = int(Cmd.FLUSH)


@dataclass(frozen=True)
class Transmission:
    """What a connection negotiated: the export as advertised, and its options."""

    export: ExportInfo
    structured: bool
    allocation: bool


def refusal(
    t: Transmission, cmd: int, flags: int, offset: int, length: int
) -> tuple[int, str] | None:
    """``(errno, message)`` if the server must refuse this request itself, else ``None``."""
    return command_refusal(t, cmd, flags) or range_refusal(t, cmd, offset, length)


def command_refusal(t: Transmission, cmd: int, flags: int) -> tuple[int, str] | None:
    """The part of ``refusal`` that depends on the command and its flags only (the same
    answer for every request with them: a caller may remember it)."""
    if cmd not in Cmd._value2member_map_ or cmd == Cmd.DISC:
        return Errno.EINVAL, f"unknown command {cmd}"
    command = Cmd(cmd)
    unknown = flags & ~int(KNOWN_CMD_FLAGS)  # int: ~ of an IntFlag keeps only its own bits
    if unknown:
        return Errno.EINVAL, f"unknown command flags {unknown:#x}"
    if command in WRITES and t.export.read_only:
        return Errno.EPERM, f"export {t.export.name!r} is read-only"
    offered = _not_offered(t, command, CmdFlag(flags))
    if offered is not None:
        return Errno.EINVAL, offered
    return None


def _not_offered(t: Transmission, cmd: Cmd, flags: CmdFlag) -> str | None:
    needed = NEEDS_FLAG.get(cmd)
    if needed is not None and cmd is not Cmd.CACHE and not t.export.flags & needed:
        return f"{cmd.name} was not offered"
    if cmd is Cmd.BLOCK_STATUS and not t.allocation:
        return "BLOCK_STATUS without a selected metadata context"
    for flag in CmdFlag:
        if not flag & flags:
            continue
        if flag in FLAG_NEEDS and not t.export.flags & FLAG_NEEDS[flag]:
            return f"flag {flag.name} was not offered"
        if flag in FLAG_COMMANDS and cmd not in FLAG_COMMANDS[flag]:
            return f"flag {flag.name} is not valid on {cmd.name}"
    return None


def range_refusal(t: Transmission, cmd: int, offset: int, length: int) -> tuple[int, str] | None:
    """The part of ``refusal`` about the range; plain ints, as it runs for every request."""
    if cmd == FLUSH:
        return (Errno.EINVAL, "FLUSH with an offset or length") if offset or length else None
    export = t.export
    if length == 0:
        return Errno.EINVAL, f"{Cmd(cmd).name} of 0 bytes"
    if offset + length > (export.size or 0):
        error = Errno.ENOSPC if cmd in GROWING else Errno.EINVAL
        message = f"{Cmd(cmd).name} of {length} bytes at {offset} runs past the end"
        return error, f"{message} ({export.size})"
    if length > export.max_payload and cmd in PAYLOAD_COMMANDS:
        limit = export.max_payload
        return Errno.EINVAL, f"{Cmd(cmd).name} of {length} bytes exceeds the maximum {limit}"
    align = export.min_block
    if align > 1 and (offset % align or length % align):
        return Errno.EINVAL, f"{Cmd(cmd).name} at {offset}+{length} is not aligned to {align}"
    return None


# --- encoding -----------------------------------------------------------------------------


def wire_error(error: int) -> int:
    return error if error in Errno._value2member_map_ else Errno.EIO


def encode(reply: ServerReply, structured: bool) -> list[Part]:
    """The parts of ``reply``'s message, to be written in order with nothing between."""
    if isinstance(reply, ReadReply):
        return _read(reply) if structured else _simple_read(reply)
    if isinstance(reply, StatusReply):
        payload = U32.pack(ALLOCATION_ID) + b"".join(EXTENT.pack(*e) for e in reply.extents)
        return [chunk(reply.cookie, Chunk.BLOCK_STATUS, len(payload), done=True), payload]
    if reply.error and structured:
        return _error(reply.cookie, reply.error, reply.message, None, done=True)
    return [simple(reply.cookie, wire_error(reply.error) if reply.error else 0)]


def simple(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(cookie: int, ctype: int, length: int, *, done: bool) -> bytes:
    flags = REPLY_FLAG_DONE if done else 0
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, ctype, cookie, length)


def _error(cookie: int, error: int, message: str, offset: int | None, *, done: bool) -> list[Part]:
    text = message.encode("utf-8", errors="replace")[:MAX_STRING]
    body = ERROR_HEADER.pack(wire_error(error), len(text)) + text
    if offset is None:
        return [chunk(cookie, Chunk.ERROR, len(body), done=done), body]
    body += U64.pack(offset)
    return [chunk(cookie, Chunk.ERROR_OFFSET, len(body), done=done), body]


OFFSET_DATA = int(Chunk.OFFSET_DATA)


def _read(reply: ReadReply) -> list[Part]:
    pieces = reply.pieces
    if len(pieces) == 1 and not reply.error and not isinstance(pieces[0], int):
        return _one_piece(reply.cookie, reply.offset, pieces[0])
    parts: list[Part] = []
    offset = reply.offset
    last = len(reply.pieces) - 1
    for index, piece in enumerate(reply.pieces):
        done = index == last and not reply.error
        if isinstance(piece, int):
            parts.append(chunk(reply.cookie, Chunk.OFFSET_HOLE, HOLE.size, done=done))
            parts.append(HOLE.pack(offset, piece))
            offset += piece
        else:
            parts.append(chunk(reply.cookie, Chunk.OFFSET_DATA, 8 + len(piece), done=done))
            parts += [U64.pack(offset), piece]
            offset += len(piece)
    if reply.error:
        parts += _error(reply.cookie, reply.error, reply.message, reply.error_offset, done=True)
    elif not reply.pieces:
        parts.append(chunk(reply.cookie, Chunk.NONE, 0, done=True))
    return parts


def _one_piece(cookie: int, offset: int, data: Part) -> list[Part]:
    """A READ answered by one OFFSET_DATA chunk (most are): its header in one part."""
    length = 8 + len(data)
    header = DATA_CHUNK_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, OFFSET_DATA, cookie, length, offset
    )
    return [header, data]


def _simple_read(reply: ReadReply) -> list[Part]:
    if reply.error:
        return [simple(reply.cookie, wire_error(reply.error))]
    parts: list[Part] = [simple(reply.cookie)]
    parts += [bytes(p) if isinstance(p, int) else p for p in reply.pieces]
    return parts
