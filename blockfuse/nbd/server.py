"""A TEST FAKE, not a server: the other half of the client core for pair tests.

Nothing in blockfuse serves NBD with it: it exists so that tests can run the client
cores against a peer (``tests/nbdpair.py``, ``tests/nbdserver.py``).  It checks little,
bounds only what the tests need, and answers nothing unless a test tells it how.  The
NBD server work (a later issue) replaces it with a real server core; until then, do not
build on it.

It serves fixed-newstyle handshakes (LIST, INFO, GO, EXPORT_NAME, STRUCTURED_REPLY,
SET_META_CONTEXT for ``base:allocation``, ABORT; anything else ``ERR_UNSUP``) and turns
requests into ``Request`` events; the caller answers with the ``reply_*`` methods, in
any order.  Knobs let tests play older or stricter servers (no structured replies, no
GO, no listing).  It trusts nothing the client sends beyond the protocol's limits.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from ..errors import ProtocolError
from .buffer import ReceiveBuffer
from .constants import (
    BASE_ALLOCATION,
    CHUNK_HEADER,
    CLIENT_FLAGS,
    DEFAULT_MAX_PAYLOAD,
    ERROR_HEADER,
    EXPORT_NAME_PADDING,
    EXPORT_NAME_REPLY,
    GREETING,
    HOLE,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    NBDMAGIC,
    OPTION,
    OPTION_REPLY,
    OPTION_REPLY_MAGIC,
    REPLY_FLAG_DONE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    U16,
    U32,
    U64,
    Chunk,
    Cmd,
    HandshakeFlag,
    InfoType,
    Opt,
    Rep,
)
from .events import (
    NEED_DATA,
    ClientGone,
    ExportInfo,
    NeedData,
    Request,
    ServerEvent,
    ServerReady,
)

MAX_OPTION = 1 << 16
ALLOCATION_ID = 7


class ServerState(enum.Enum):
    """What the fake reads next (``next_event`` dispatches on it)."""

    FLAGS = "client flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    DONE = "done"
    BROKEN = "broken"


class ServerCore:
    """The test fake's core (see the module text): bytes in, ``ServerEvent`` out."""

    def __init__(
        self,
        exports: dict[str, ExportInfo],
        *,
        listing: bool = True,
        structured: bool = True,
        go: bool = True,
        fixed: bool = True,
    ) -> None:
        self.exports = exports
        self._listing, self._sr_offered, self._go = listing, structured, go
        self._offered = HandshakeFlag.NO_ZEROES | (HandshakeFlag.FIXED_NEWSTYLE if fixed else 0)
        self._buf = ReceiveBuffer()
        self._out = bytearray(GREETING.pack(NBDMAGIC, IHAVEOPT, self._offered))
        self.state = ServerState.FLAGS
        self._no_zeroes = False
        self.structured = False
        self._header: tuple[int, int, int, int, int] | None = None
        self._steps: dict[ServerState, Callable[[], ServerEvent | NeedData | None]] = {
            ServerState.FLAGS: self._flags,
            ServerState.OPTIONS: self._option,
            ServerState.TRANSMISSION: self._request,
            ServerState.DONE: lambda: NEED_DATA,
        }
        """The dispatch table: what ``next_event`` does in each state."""

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buf.feed(data)

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def next_event(self) -> ServerEvent | NeedData:
        """The next event, or ``NEED_DATA``; raises ``ProtocolError`` (and stays broken)."""
        if self.state is ServerState.BROKEN:
            raise ProtocolError("the client already broke the protocol")
        try:
            while (result := self._steps[self.state]()) is None:
                pass
        except ProtocolError:
            self.state = ServerState.BROKEN
            raise
        return result

    # --- handshake ------------------------------------------------------------------

    def _flags(self) -> NeedData | None:
        raw = self._buf.take(CLIENT_FLAGS.size)
        if raw is None:
            return NEED_DATA
        (flags,) = CLIENT_FLAGS.unpack(raw)
        if flags & ~self._offered:
            raise ProtocolError(f"client flags {flags:#x} beyond the offered {self._offered:#x}")
        self._no_zeroes = bool(flags & HandshakeFlag.NO_ZEROES)
        self.state = ServerState.OPTIONS
        return None

    def _option(self) -> ServerEvent | NeedData | None:
        raw = self._buf.peek(OPTION.size)
        if raw is None:
            return NEED_DATA
        magic, option, length = OPTION.unpack(raw)
        if magic != IHAVEOPT or length > MAX_OPTION:
            raise ProtocolError(f"bad option header (magic {magic:#x}, length {length})")
        if len(self._buf) < OPTION.size + length:
            return NEED_DATA
        self._buf.take(OPTION.size)
        return self._handle_option(option, self._buf.take(length) or b"")

    def _handle_option(self, option: int, data: bytes) -> ServerEvent | None:
        if option == Opt.EXPORT_NAME:
            return self._export_name(data)
        if option == Opt.ABORT:
            self._reply(option, Rep.ACK)
            self.state = ServerState.DONE
            return ClientGone()
        if option == Opt.LIST and not data:
            self._list()
            return None
        if option in (Opt.INFO, Opt.GO) and (option == Opt.INFO or self._go):
            return self._info_go(option, data)
        if option == Opt.STRUCTURED_REPLY and self._sr_offered and not data:
            self.structured = True
            self._reply(option, Rep.ACK)
            return None
        if option == Opt.SET_META_CONTEXT and self.structured:
            self._set_meta_context(data)
            return None
        self._reply(option, Rep.ERR_UNSUP, b"unsupported here")
        return None

    def _reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        self._out += OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, rtype, len(data)) + data

    def _export_name(self, data: bytes) -> ServerEvent:
        export = self.exports.get(data.decode(errors="replace"))
        if export is None:
            raise ProtocolError(f"EXPORT_NAME for unknown export {data!r}")
        self._out += EXPORT_NAME_REPLY.pack(export.size or 0, export.flags)
        if not self._no_zeroes:
            self._out += bytes(EXPORT_NAME_PADDING)
        self.state = ServerState.TRANSMISSION
        return ServerReady(export, self.structured)

    def _list(self) -> None:
        if not self._listing:
            self._reply(Opt.LIST, Rep.ERR_POLICY, b"listing is disabled")
            return None
        for name, export in self.exports.items():
            raw = name.encode()
            self._reply(
                Opt.LIST, Rep.SERVER, U32.pack(len(raw)) + raw + export.description.encode()
            )
        self._reply(Opt.LIST, Rep.ACK)
        return None

    def _info_go(self, option: int, data: bytes) -> ServerEvent | None:
        parsed = parse_info_request(data)
        if parsed is None:
            self._reply(option, Rep.ERR_INVALID, b"malformed request")
            return None
        name, infos = parsed
        export = self.exports.get(name)
        if export is None:
            self._reply(option, Rep.ERR_UNKNOWN, f"no export {name!r}".encode())
            return None
        for item in info_items(export, infos):
            self._reply(option, Rep.INFO, item)
        self._reply(option, Rep.ACK)
        if option != Opt.GO:
            return None
        self.state = ServerState.TRANSMISSION
        return ServerReady(export, self.structured)

    def _set_meta_context(self, data: bytes) -> None:
        if len(data) < 4 or len(data) < 8 + U32.unpack(data[:4])[0]:
            self._reply(Opt.SET_META_CONTEXT, Rep.ERR_INVALID)
            return None
        (n,) = U32.unpack(data[:4])
        if BASE_ALLOCATION.encode() in data[8 + n :]:
            context = U32.pack(ALLOCATION_ID) + BASE_ALLOCATION.encode()
            self._reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, context)
        self._reply(Opt.SET_META_CONTEXT, Rep.ACK)
        return None

    # --- transmission -----------------------------------------------------------------

    def _request(self) -> ServerEvent | NeedData | None:
        if self._header is None:
            raw = self._buf.take(REQUEST.size)
            if raw is None:
                return NEED_DATA
            magic, flags, cmd, cookie, offset, length = REQUEST.unpack(raw)
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"request with wrong magic {magic:#x}")
            if cmd == Cmd.WRITE and length > DEFAULT_MAX_PAYLOAD:
                raise ProtocolError(f"WRITE payload of {length} bytes")
            self._header = (flags, cmd, cookie, offset, length)
        flags, cmd, cookie, offset, length = self._header
        if cmd == Cmd.DISC:
            self.state = ServerState.DONE
            return ClientGone()
        data = b""
        if cmd == Cmd.WRITE and (data := self._buf.take(length) or b"") == b"":
            return NEED_DATA
        self._header = None
        return Request(cookie, cmd, flags, offset, length, data)

    def reply(self, cookie: int, error: int = 0, data: bytes = b"") -> None:
        """A simple reply (with a READ's data when ``error`` is 0)."""
        self._out += SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie) + data

    def chunk(self, cookie: int, ctype: int, payload: bytes = b"", done: bool = False) -> None:
        flags = REPLY_FLAG_DONE if done else 0
        header = CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, ctype, cookie, len(payload))
        self._out += header + payload

    def reply_read(self, cookie: int, offset: int, data: bytes, *, block: int = 4096) -> None:
        """A READ's answer: simple, or chunks with holes for all-zero blocks, last first."""
        if not self.structured:
            return self.reply(cookie, 0, data)
        pieces = [(i, data[i : i + block]) for i in range(0, len(data), block)]
        for n, (i, piece) in enumerate(reversed(pieces)):
            if piece.count(0) == len(piece):
                payload, ctype = HOLE.pack(offset + i, len(piece)), Chunk.OFFSET_HOLE
            else:
                payload, ctype = U64.pack(offset + i) + piece, Chunk.OFFSET_DATA
            self.chunk(cookie, ctype, payload, done=n == len(pieces) - 1)
        return None

    def reply_error(self, cookie: int, error: int, message: str = "") -> None:
        if not self.structured:
            return self.reply(cookie, error)
        raw = message.encode()
        self.chunk(cookie, Chunk.ERROR, ERROR_HEADER.pack(error, len(raw)) + raw, done=True)
        return None

    def reply_block_status(self, cookie: int, extents: list[tuple[int, int]]) -> None:
        payload = U32.pack(ALLOCATION_ID) + b"".join(U32.pack(n) + U32.pack(f) for n, f in extents)
        self.chunk(cookie, Chunk.BLOCK_STATUS, payload, done=True)


def parse_info_request(data: bytes) -> tuple[str, list[int]] | None:
    if len(data) < 6:
        return None
    (n,) = U32.unpack(data[:4])
    if n > len(data) - 6:
        return None
    (count,) = U16.unpack(data[4 + n : 6 + n])
    if len(data) != 6 + n + 2 * count:
        return None
    infos = [U16.unpack(data[6 + n + 2 * i : 8 + n + 2 * i])[0] for i in range(count)]
    return data[4 : 4 + n].decode(errors="replace"), infos


def info_items(export: ExportInfo, infos: list[int]) -> list[bytes]:
    items = [INFO_EXPORT.pack(InfoType.EXPORT, export.size or 0, export.flags)]
    if InfoType.NAME in infos:
        items.append(U16.pack(InfoType.NAME) + export.name.encode())
    if InfoType.DESCRIPTION in infos and export.description:
        items.append(U16.pack(InfoType.DESCRIPTION) + export.description.encode())
    if InfoType.BLOCK_SIZE in infos and export.block_size_given:
        sizes = (export.min_block, export.preferred_block, export.max_payload)
        items.append(INFO_BLOCK_SIZE.pack(InfoType.BLOCK_SIZE, *sizes))
    return items
