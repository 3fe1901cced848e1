"""The client side of NBD transmission as a sans-io state machine.

Requests go out as bytes from ``request()``, each with a fresh cookie; replies come in
through ``receive_data()`` and leave as events from ``next_event()``.  Many requests may
be in flight, and the server answers them in any order, interleaving the chunks of
structured replies; the only thing tying a reply to its request is the cookie::

    request(READ, 0, 8192)   -> cookie 1      +---------------------------------------+
    request(WRITE, 0, 512)   -> cookie 2      | reply header: which magic?            |
                                              |   simple (16 B):  cookie, error       |
    <- chunk cookie=1 DATA off=4096 (4 KiB)   |     READ ok -> stream `length` bytes  |
    <- simple cookie=2 error=0                |   chunk (20 B): cookie, type, length  |
    <- chunk cookie=1 HOLE off=0 len=4096     |     DATA  -> 8 B offset, then stream  |
    <- chunk cookie=1 NONE DONE               |     HOLE / STATUS / ERROR -> read all |
                                              |   DONE flag -> check coverage, Done   |
    events: ReadData(1, 4096, view)           +---------------------------------------+
            Done(2)  ReadHole(1, 0, 4096)  Done(1)

The invariant that keeps a hostile or broken server harmless: before waiting for any
payload its length is checked against what we asked for (a READ's data) or a protocol
limit (status, errors), so we never buffer more than one bounded header or chunk; data
is streamed out as zero-copy views of what arrived.  Every violation (wrong magic,
unknown cookie, a chunk outside its request, overlapping chunks, a successful READ that
does not cover its range) raises ``ProtocolError`` with what arrived, and the machine
stays broken: the connection must be dropped.  A server's error reply is not a
violation: it becomes ``Done(cookie, errno)`` and the connection lives on.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ProtocolError, ReadOnly, Unimplemented, Unsafe
from .buffer import ReceiveBuffer
from .chunks import (
    Pending,
    check_block_status_done,
    check_chunk,
    claim,
    parse_block_status,
    parse_error,
    wire_errno,
)
from .constants import (
    BASE_ALLOCATION,
    CHUNK_HEADER,
    DATA_CHUNK_HEADER,
    DEFAULT_MAX_PAYLOAD,
    HOLE,
    NO_CMD_FLAGS,
    REPLY_FLAG_DONE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    U32,
    U64,
    Chunk,
    Cmd,
    CmdFlag,
    TxFlag,
)
from .events import (
    NEED_DATA,
    Done,
    ExportInfo,
    NeedData,
    Negotiated,
    PeerClosed,
    ReadData,
    ReadHole,
    ReplyEvent,
)

NEEDS_FLAG = {
    Cmd.FLUSH: TxFlag.SEND_FLUSH,
    Cmd.TRIM: TxFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TxFlag.SEND_WRITE_ZEROES,
    Cmd.CACHE: TxFlag.SEND_CACHE,
}
FLAG_NEEDS = {
    CmdFlag.FUA: TxFlag.SEND_FUA,
    CmdFlag.DF: TxFlag.SEND_DF,
    CmdFlag.FAST_ZERO: TxFlag.SEND_FAST_ZERO,
}
FLAG_COMMANDS = {
    CmdFlag.NO_HOLE: {Cmd.WRITE_ZEROES},
    CmdFlag.DF: {Cmd.READ},
    CmdFlag.REQ_ONE: {Cmd.BLOCK_STATUS},
    CmdFlag.FAST_ZERO: {Cmd.WRITE_ZEROES},
}
WRITES = {Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES}
NO_RANGE = {Cmd.FLUSH, Cmd.DISC}


class ReplyState(enum.Enum):
    """What the reply parser reads next (``next_event`` dispatches on it)."""

    HEADER = "reply header"
    SIMPLE_DATA = "simple reply data"
    DATA_OFFSET = "data chunk offset"
    CHUNK_DATA = "data chunk payload"
    CHUNK_PAYLOAD = "chunk payload"
    BROKEN = "broken"


@dataclass
class OpenReply:
    """The chunk or simple reply being read: where its next payload bytes belong."""

    cookie: int
    pending: Pending
    flags: int = 0
    ctype: int = 0
    length: int = 0
    offset: int = 0
    remaining: int = 0


class ClientTransmission:
    """Frames requests and parses replies for one negotiated connection."""

    def __init__(self, negotiated: Negotiated) -> None:
        self.export: ExportInfo = negotiated.export
        self.structured = negotiated.structured
        self.allocation_context = negotiated.contexts.get(BASE_ALLOCATION)
        self._context_ids = set(negotiated.contexts.values())
        align = self.export.min_block
        biggest = min(self.export.max_payload, DEFAULT_MAX_PAYLOAD)
        self.max_payload = max(biggest - biggest % align, align)
        """The largest READ/WRITE we send: the server's maximum (at most 32 MiB), aligned."""
        self._pending: dict[int, Pending] = {}
        self._cookies = itertools.count(1)
        self._buf = ReceiveBuffer()
        self.state = ReplyState.HEADER
        self._reply: OpenReply | None = None
        self._disconnected = False
        self._eof = False
        self._ready: ReplyEvent | None = None
        self._checked: set[tuple[Cmd, CmdFlag]] = set()
        """(command, flags) pairs already found usable on this connection."""
        self._steps: dict[ReplyState, Callable[[], ReplyEvent | NeedData | None]] = {
            ReplyState.HEADER: self._header,
            ReplyState.SIMPLE_DATA: self._stream_data,
            ReplyState.CHUNK_DATA: self._stream_data,
            ReplyState.DATA_OFFSET: self._data_offset,
            ReplyState.CHUNK_PAYLOAD: self._chunk_payload,
        }

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def can(self, flag: TxFlag) -> bool:
        return bool(self.export.flags & flag)

    # --- requests -----------------------------------------------------------------------

    def request(
        self, cmd: Cmd, offset: int = 0, length: int = 0, flags: CmdFlag = NO_CMD_FLAGS
    ) -> tuple[int, bytes]:
        """``(cookie, header)`` for a request; a WRITE's payload goes right after the header.

        Raises ``Unsafe`` (bad range, alignment or size), ``ReadOnly`` or ``Unimplemented``
        (the server did not offer the command or flag) and changes nothing then.
        """
        self._check(cmd, offset, length, flags)
        cookie = next(self._cookies)
        self._pending[cookie] = Pending(cmd, offset, length)
        return cookie, REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)

    def disconnect(self) -> bytes:
        """The ``NBD_CMD_DISC`` request; nothing may be sent after it."""
        self._disconnected = True
        return REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0)

    def _check(self, cmd: Cmd, offset: int, length: int, flags: CmdFlag) -> None:
        if self._disconnected or self.state is ReplyState.BROKEN:
            raise Unsafe("the connection is closed")
        if (cmd, flags) not in self._checked:
            self._check_supported(cmd, flags)
            self._checked.add((cmd, flags))
        if cmd not in NO_RANGE:
            self._check_range(cmd, offset, length)
        elif offset or length:
            raise Unsafe(f"{cmd.name} takes no offset or length")

    def _check_supported(self, cmd: Cmd, flags: CmdFlag) -> None:
        if cmd in WRITES and self.export.read_only:
            raise ReadOnly(f"export {self.export.name!r} is read-only")
        needed = NEEDS_FLAG.get(cmd)
        if needed is not None and not self.can(needed):
            raise Unimplemented(f"the server does not offer {cmd.name}")
        if cmd is Cmd.BLOCK_STATUS and self.allocation_context is None:
            raise Unimplemented("the server does not offer base:allocation block status")
        if cmd is Cmd.DISC:
            raise Unsafe("use disconnect() for NBD_CMD_DISC")
        for flag in CmdFlag:
            if flag & flags and not self._flag_allowed(flag, cmd):
                raise Unimplemented(f"flag {flag.name} is not usable on {cmd.name} here")

    def _flag_allowed(self, flag: CmdFlag, cmd: Cmd) -> bool:
        if flag in FLAG_NEEDS and not self.can(FLAG_NEEDS[flag]):
            return False
        return flag not in FLAG_COMMANDS or cmd in FLAG_COMMANDS[flag]

    def _check_range(self, cmd: Cmd, offset: int, length: int) -> None:
        size, align = self.export.size or 0, self.export.min_block
        if length <= 0 or offset < 0 or offset + length > size:
            raise Unsafe(f"{cmd.name} of {length} bytes at {offset} is outside 0..{size}")
        if offset % align or length % align:
            raise Unsafe(f"{cmd.name} at {offset}+{length} is not aligned to {align} bytes")
        if cmd in (Cmd.READ, Cmd.WRITE) and length > self.max_payload:
            raise Unsafe(f"{cmd.name} of {length} bytes exceeds {self.max_payload}")
        if length > 0xFFFFFFFF:
            raise Unsafe(f"{cmd.name} of {length} bytes does not fit 32 bits")

    # --- replies ------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the server; ``b""`` marks the end of the connection."""
        if not data:
            self._eof = True
        self._buf.feed(data)

    @property
    def at_rest(self) -> bool:
        """Between two replies with nothing buffered: the next bytes begin a reply."""
        return self.state is ReplyState.HEADER and not self._buf.size and self._ready is None

    def header_size(self, cmd: Cmd) -> int:
        """The bytes that begin a reply to ``cmd`` when it is the usual one: a simple
        reply's header, or a chunk's header (with a data chunk's offset for a READ)."""
        if not self.structured:
            return SIMPLE_REPLY.size
        return CHUNK_HEADER.size + U64.size if cmd is Cmd.READ else CHUNK_HEADER.size

    def receive_header(self, raw: bytes | bytearray | memoryview) -> None:
        """``receive_data(raw)`` for bytes that begin a reply (``at_rest``), parsed in
        place when they are exactly one simple reply header or one chunk header (a data
        chunk's with its offset): the lean path of a request read by its caller.

        The checks are the ones ``next_event`` makes, but a violation raises here
        (``ProtocolError``, and the machine stays broken); anything else is only fed.
        Then a READ's data streams (``payload_target``), or the reply's ``Done`` is the
        next event.
        """
        if not self.at_rest or len(raw) < U32.size:
            self.receive_data(raw)
            return
        (magic,) = U32.unpack_from(raw)
        try:
            if magic == SIMPLE_REPLY_MAGIC and len(raw) == SIMPLE_REPLY.size:
                self._simple(*SIMPLE_REPLY.unpack(raw)[1:])
            elif magic == STRUCTURED_REPLY_MAGIC and len(raw) >= CHUNK_HEADER.size:
                self._lean_chunk(raw)
            else:
                self.receive_data(raw)
        except ProtocolError:
            self.state = ReplyState.BROKEN
            raise

    def receive_whole(
        self, raw: bytes | bytearray | memoryview, cookie: int, data: int
    ) -> Done | None:
        """The lean path's best case, without any state on the way: ``raw`` (at rest) is
        exactly the header of a reply that answers ``cookie`` whole, and the ``data``
        bytes after it are its payload, already where they belong: a simple reply (a
        successful READ's with all its data), a single data chunk with DONE covering the
        whole READ, or a NONE chunk ending anything but a READ or BLOCK_STATUS.  Returns
        that reply's ``Done`` (the request is no longer in flight); ``None`` when it is
        not such a reply, having changed nothing (``receive_header`` then says what it is).
        """
        pending = self._pending.get(cookie)
        if pending is None or pending.chunked or self.state is not ReplyState.HEADER:
            return None
        if self._buf.size or self._ready is not None:
            return None
        size = len(raw)
        if size == DATA_CHUNK_HEADER.size:
            magic, flags, ctype, got, length, offset = DATA_CHUNK_HEADER.unpack(raw)
            whole = magic == STRUCTURED_REPLY_MAGIC and ctype == Chunk.OFFSET_DATA
            whole = whole and pending.cmd is Cmd.READ and offset == pending.offset
            whole = whole and length - U64.size == pending.length == data
        elif size == SIMPLE_REPLY.size:
            magic, error, got = SIMPLE_REPLY.unpack(raw)
            wanted = pending.length if pending.cmd is Cmd.READ and not error else 0
            if magic == SIMPLE_REPLY_MAGIC and got == cookie and data == wanted:
                return self._whole(cookie, wire_errno(error) if error else 0)
            return None
        elif size == CHUNK_HEADER.size:
            magic, flags, ctype, got, length = CHUNK_HEADER.unpack(raw)
            whole = magic == STRUCTURED_REPLY_MAGIC and ctype == Chunk.NONE
            whole = whole and length == data == 0
            whole = whole and pending.cmd not in (Cmd.READ, Cmd.BLOCK_STATUS)
        else:
            return None
        if not whole or got != cookie or not flags & REPLY_FLAG_DONE or not self.structured:
            return None
        return self._whole(cookie, 0)

    def _whole(self, cookie: int, error: int) -> Done:
        del self._pending[cookie]
        return Done(cookie, error)

    def _lean_chunk(self, raw: bytes | bytearray | memoryview) -> None:
        flags, ctype, cookie, length = CHUNK_HEADER.unpack_from(raw)[1:]
        offset = CHUNK_HEADER.size + U64.size if ctype == Chunk.OFFSET_DATA else CHUNK_HEADER.size
        if len(raw) != offset:
            self.receive_data(raw)
            return
        self._chunk_header(flags, ctype, cookie, length)
        if self.state is ReplyState.DATA_OFFSET:
            self._start_data(U64.unpack_from(raw, CHUNK_HEADER.size)[0])

    def next_event(self) -> ReplyEvent | NeedData:
        """The next event, or ``NEED_DATA``; raises ``ProtocolError`` (and stays broken)."""
        if self.state is ReplyState.BROKEN:
            raise ProtocolError("the connection already broke the protocol")
        try:
            while (event := self._next_step()) is None:
                pass
        except ProtocolError:
            self.state = ReplyState.BROKEN
            raise
        if event is NEED_DATA and self._eof and (self._pending or len(self._buf)):
            where = self.state.value
            self.state = ReplyState.BROKEN
            raise PeerClosed(
                f"the server closed the connection with {len(self._pending)} request(s) "
                f"in flight (while reading a {where})"
            )
        return event

    def payload_target(self) -> tuple[int, int, int] | None:
        """``(cookie, offset, remaining)`` while a READ's data streams and nothing is buffered.

        The layer above may then receive up to ``remaining`` bytes straight into the
        request's buffer at ``offset`` and report them with ``payload_received`` instead
        of ``receive_data``: no copy through this core.
        """
        s = self._reply
        if (
            self.state not in (ReplyState.SIMPLE_DATA, ReplyState.CHUNK_DATA)
            or len(self._buf)
            or self._ready
        ):
            return None
        assert s is not None
        return (s.cookie, s.offset, s.remaining) if s.remaining else None

    def payload_received(self, n: int) -> None:
        """``n`` bytes of the ``payload_target`` arrived (already in the caller's buffer)."""
        s = self._reply
        assert s is not None and self.payload_target() is not None and 0 < n <= s.remaining
        s.offset += n
        s.remaining -= n
        if s.remaining == 0:
            self._after_data(s)

    def _next_step(self) -> ReplyEvent | NeedData | None:
        """An event finished by the last step comes out before the next step runs."""
        if self._ready is not None:
            event, self._ready = self._ready, None
            return event
        return self._steps[self.state]()

    def _header(self) -> NeedData | None:
        raw = self._buf.peek(4)
        if raw is None:
            return NEED_DATA
        (magic,) = U32.unpack(raw)
        if magic == SIMPLE_REPLY_MAGIC:
            if (rest := self._buf.take(SIMPLE_REPLY.size)) is None:
                return NEED_DATA
            self._simple(*SIMPLE_REPLY.unpack(rest)[1:])
        elif magic == STRUCTURED_REPLY_MAGIC:
            if (rest := self._buf.take(CHUNK_HEADER.size)) is None:
                return NEED_DATA
            self._chunk_header(*CHUNK_HEADER.unpack(rest)[1:])
        else:
            raise ProtocolError(f"reply with unknown magic {magic:#010x}")
        return None

    def _lookup(self, cookie: int) -> Pending:
        pending = self._pending.get(cookie)
        if pending is None:
            raise ProtocolError(f"reply for unknown cookie {cookie:#x}")
        return pending

    def _simple(self, error: int, cookie: int) -> None:
        pending = self._lookup(cookie)
        if pending.chunked:
            raise ProtocolError(f"simple reply for cookie {cookie:#x} after structured chunks")
        if error or pending.cmd is not Cmd.READ:
            self._finish(cookie, wire_errno(error) if error else 0)
            return
        self._reply = OpenReply(cookie, pending, offset=pending.offset, remaining=pending.length)
        self.state = ReplyState.SIMPLE_DATA

    def _finish(self, cookie: int, error: int, message: str = "") -> None:
        del self._pending[cookie]
        self._ready = Done(cookie, error, message)
        self.state = ReplyState.HEADER

    def _chunk_header(self, flags: int, ctype: int, cookie: int, length: int) -> None:
        if not self.structured:
            raise ProtocolError("structured reply chunk on a connection without them")
        pending = self._lookup(cookie)
        pending.chunked = True
        self._reply = OpenReply(cookie, pending, flags=flags, ctype=ctype, length=length)
        check_chunk(pending, ctype, length, flags)
        if ctype == Chunk.OFFSET_DATA:
            self.state = ReplyState.DATA_OFFSET
        elif ctype == Chunk.NONE:
            self._end_chunk()
        else:
            self.state = ReplyState.CHUNK_PAYLOAD

    def _data_offset(self) -> NeedData | None:
        raw = self._buf.take(U64.size)
        if raw is None:
            return NEED_DATA
        self._start_data(U64.unpack(raw)[0])
        return None

    def _start_data(self, offset: int) -> None:
        s = self._reply
        assert s is not None
        s.offset = offset
        s.remaining = s.length - U64.size
        claim(s.pending, s.offset, s.remaining, "data")
        self.state = ReplyState.CHUNK_DATA

    def _stream_data(self) -> ReplyEvent | NeedData | None:
        s = self._reply
        assert s is not None
        if s.remaining == 0:
            self._after_data(s)
            return None
        view = self._buf.take_some(s.remaining)
        if view is None:
            return NEED_DATA
        offset = s.offset
        s.offset += len(view)
        s.remaining -= len(view)
        if s.remaining == 0:
            self._after_data(s)
        return ReadData(s.cookie, offset, view)

    def _after_data(self, s: OpenReply) -> None:
        if self.state is ReplyState.SIMPLE_DATA:
            self._finish(s.cookie, 0)
        else:
            self._end_chunk()

    def _chunk_payload(self) -> ReplyEvent | NeedData | None:
        s = self._reply
        assert s is not None
        raw = self._buf.take(s.length)
        if raw is None:
            return NEED_DATA
        event = self._parse_payload(s, raw)
        self._end_chunk()
        return event

    def _parse_payload(self, s: OpenReply, raw: bytes) -> ReplyEvent | None:
        if s.ctype == Chunk.OFFSET_HOLE:
            offset, size = HOLE.unpack(raw)
            claim(s.pending, offset, size, "hole")
            return ReadHole(s.cookie, offset, size)
        if s.ctype == Chunk.BLOCK_STATUS:
            return parse_block_status(s.pending, s.cookie, raw, self._context_ids)
        error, message = parse_error(s.pending, s.ctype, raw)
        if not s.pending.error:
            s.pending.error, s.pending.message = error, message
        return None

    def _end_chunk(self) -> None:
        s = self._reply
        assert s is not None
        self.state = ReplyState.HEADER
        if not s.flags & REPLY_FLAG_DONE:
            return
        p = s.pending
        if p.cmd is Cmd.READ and not p.error and p.coverage.total != p.length:
            raise ProtocolError(
                f"READ reply (cookie {s.cookie:#x}) ended after {p.coverage.total} "
                f"of {p.length} bytes"
            )
        check_block_status_done(p, self._context_ids)
        self._finish(s.cookie, p.error, p.message)
