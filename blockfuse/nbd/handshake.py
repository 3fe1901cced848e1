"""The client side of the NBD handshake as a sans-io state machine.

The client is goal-driven: it is built to either open one export (``ClientHandshake.go``)
or list the server's exports (``ClientHandshake.list``), and it decides by itself which
options to send.  The layer above only moves bytes::

    hs = ClientHandshake.go("disk0")
    while (event := hs.next_event()) is NEED_DATA:
        send(hs.data_to_send())
        hs.receive_data(recv())
    send(hs.data_to_send())     # a final NBD_OPT_ABORT, if the goal needs one
    # event: Negotiated, ExportList or OptionRefused

The conversation for ``go`` (fixed newstyle; one option in flight at a time)::

    S: NBDMAGIC IHAVEOPT flags           C: client flags (what was offered of FIXED, NO_ZEROES)
   [C: STARTTLS                          S: ACK -> StartTLS: the TLS handshake, then
                                            tls_started(); error -> OptionRefused, C: ABORT]
    C: STRUCTURED_REPLY                  S: ACK | ERR_UNSUP (simple replies then)
    C: SET_META_CONTEXT base:allocation  S: META_CONTEXT(id)* ACK | error (no block status)
    C: GO(name, [BLOCK_SIZE, NAME, DESCRIPTION])
                                         S: INFO* ACK -> Negotiated
                                            ERR_UNSUP -> C: EXPORT_NAME, S: size flags [zeroes]
                                            other error -> OptionRefused, C: ABORT

An export we cannot use (larger than ``MAX_EXPORT_SIZE``) ends a ``go`` as
``ExportRefused``, with NBD_CMD_DISC to send: the server is in transmission by then.

A server without FIXED_NEWSTYLE only understands EXPORT_NAME.  ``list`` sends LIST, then
INFO for each export (when details are wanted), then ABORT.

With ``tls`` (an ``nbds`` URI) STARTTLS is the first option, and the only one sent in
plaintext; nothing else is sent until its reply.  Its ACK must be the last plaintext
byte the server sends: bytes after it in the same read are not TLS (the client speaks
first in TLS), so they are a ``ProtocolError``, never handed to TLS or parsed as NBD.
After the ACK the machine waits (``next_event`` answers ``START_TLS``, ``receive_data``
refuses bytes) until the layer above has run the TLS handshake on the same stream and
calls ``tls_started()``; then everything option-related is forgotten, as the spec asks
(structured replies, meta contexts: nothing was negotiated yet anyway), and the goal is
pursued from the start, every option again, over TLS.  There is no plaintext fallback:
a server that refuses STARTTLS (ERR_POLICY, as nbdkit without ``--tls`` answers;
ERR_UNSUP; anything) or is not fixed-newstyle ends the handshake as ``OptionRefused``
for ``NBD_OPT_STARTTLS``.  Without ``tls``, ERR_TLS_REQD to any option but INFO and GO
(a server that requires TLS answers STRUCTURED_REPLY and LIST so) ends it at once:
nothing will work without TLS.

Every length the server sends is checked against the protocol's limit before anything is
waited for, so the peer can never make us buffer more than ``MAX_OPTION_REPLY`` bytes, and
every count of replies has a bound of ours: one META_CONTEXT reply per context asked for
(it names one of them, once), ``MAX_INFO_REPLIES`` INFO replies per INFO or GO, and for a
list ``MAX_EXPORTS`` exports and ``MAX_LIST_BYTES`` bytes of SERVER and INFO replies
together.  Any violation raises ``ProtocolError`` naming what arrived, and the machine
stays broken.

Both goals share one option engine (one table from the option asked and the reply type
to what to do), which is why they live in one module of this length.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import ProtocolError
from ..units import printable
from .buffer import ReceiveBuffer
from .constants import (
    BASE_ALLOCATION,
    CLIENT_FLAGS,
    CLISERV_MAGIC,
    EXPORT_NAME_PADDING,
    EXPORT_NAME_REPLY,
    GREETING,
    IHAVEOPT,
    MAX_EXPORT_SIZE,
    MAX_EXPORTS,
    MAX_INFO_REPLIES,
    MAX_LIST_BYTES,
    MAX_OPTION_REPLY,
    NBDMAGIC,
    OPTION_REPLY,
    OPTION_REPLY_MAGIC,
    REP_ERROR_BIT,
    REQUEST,
    REQUEST_MAGIC,
    U16,
    U32,
    ClientFlag,
    Cmd,
    HandshakeFlag,
    InfoType,
    Opt,
    Rep,
    TxFlag,
)
from .events import (
    NEED_DATA,
    START_TLS,
    ExportInfo,
    ExportList,
    ExportRefused,
    HandshakeEvent,
    NeedData,
    Negotiated,
    OptionRefused,
    PeerClosed,
    StartTLS,
)
from .options import apply_info, decode_string, encode_info_request, encode_name, encode_option


class HandshakeState(enum.Enum):
    """Where the handshake is (``next_event`` dispatches on it)."""

    GREETING = "greeting"
    OPTION_REPLY = "waiting for an option reply"
    EXPORT_NAME_REPLY = "waiting for the EXPORT_NAME reply"
    TLS = "waiting for the TLS handshake"
    FINISHED = "finished"
    BROKEN = "broken"


Step = HandshakeEvent | StartTLS | NeedData | None
"""What a step of ``next_event`` returns: ``None`` when it made progress."""

WANTED_INFO = (InfoType.BLOCK_SIZE, InfoType.NAME, InfoType.DESCRIPTION)
WANTED_CONTEXTS = (BASE_ALLOCATION,)
"""What SET_META_CONTEXT asks for; a server may select each of them at most once."""


@dataclass(frozen=True)
class Goal:
    """What the handshake is for: open ``export`` (``None``: list the exports)."""

    export: str | None
    export_name: bool
    """Open with NBD_OPT_EXPORT_NAME instead of GO."""
    structured: bool
    details: bool
    """When listing, ask NBD_OPT_INFO about each export."""
    tls: bool = False
    """STARTTLS first, or fail."""


@dataclass
class Listing:
    """What NBD_OPT_LIST brought so far, and which export INFO asks about now."""

    exports: list[ExportInfo] = field(default_factory=list)
    bytes: int = 0
    index: int = 0


class ClientHandshake:
    """One handshake toward one goal; see the module text for the conversation."""

    def __init__(
        self,
        export: str | None,
        *,
        structured: bool = True,
        details: bool = True,
        export_name: bool = False,
        tls: bool = False,
    ) -> None:
        self._goal = Goal(export, export_name, structured, details, tls)
        self._buf = ReceiveBuffer()
        self._out = bytearray()
        self.state = HandshakeState.GREETING
        self._option: Opt | None = None
        self._reply: tuple[int, int] | None = None  # (reply type, length) being read
        self._no_zeroes = False
        self._structured = False
        self._contexts: dict[str, int] = {}
        self._info = ExportInfo(export or "")
        self._listing = Listing()
        self._info_replies = 0
        self._result: HandshakeEvent | None = None
        self._steps: dict[HandshakeState, Callable[[], Step]] = {
            HandshakeState.GREETING: self._greeting,
            HandshakeState.OPTION_REPLY: self._option_reply,
            HandshakeState.EXPORT_NAME_REPLY: self._export_name_reply,
            HandshakeState.TLS: lambda: START_TLS,
            HandshakeState.FINISHED: self._finished,
        }
        """The dispatch table: what ``next_event`` does in each state."""

    @classmethod
    def go(
        cls, export: str, *, structured: bool = True, export_name: bool = False, tls: bool = False
    ) -> ClientHandshake:
        """Open ``export``; ``export_name`` uses NBD_OPT_EXPORT_NAME instead of GO; ``tls``
        starts with STARTTLS (see the module text)."""
        return cls(export, structured=structured, export_name=export_name, tls=tls)

    @classmethod
    def list(cls, *, details: bool = True, tls: bool = False) -> ClientHandshake:
        return cls(None, structured=False, details=details, tls=tls)

    # --- the sans-io surface --------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the server; ``b""`` means the server closed the connection.  Refused
        (``RuntimeError``) while the TLS handshake is due: those bytes are TLS's."""
        if self.state is HandshakeState.TLS:
            raise RuntimeError("the TLS handshake is due: plaintext bytes are not taken")
        if not data and self.state is not HandshakeState.FINISHED:
            where = self.state
            self.state = HandshakeState.BROKEN
            if where is HandshakeState.EXPORT_NAME_REPLY:
                raise PeerClosed(
                    f"the server closed the connection after NBD_OPT_EXPORT_NAME "
                    f"{self._goal.export!r}: most likely it has no such export"
                )
            raise PeerClosed(f"the server closed the connection ({where.value})")
        self._buf.feed(data)

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def next_event(self) -> HandshakeEvent | StartTLS | NeedData:
        """The outcome once known, ``START_TLS`` while the TLS handshake is due, else
        ``NEED_DATA``; raises ``ProtocolError``."""
        if self.state is HandshakeState.BROKEN:
            raise ProtocolError("the handshake already failed")
        try:
            while (result := self._steps[self.state]()) is None:
                pass
        except ProtocolError:
            self.state = HandshakeState.BROKEN
            raise
        return result

    def tls_started(self) -> None:
        """The TLS handshake that ``START_TLS`` asked for succeeded: forget what options
        negotiated (the spec) and pursue the goal over TLS."""
        if self.state is not HandshakeState.TLS:
            raise RuntimeError(f"tls_started() while {self.state.value}")
        self._structured = False
        self._contexts = {}
        self._start_goal(fixed=True)

    def trailing_data(self) -> bytes:
        """What the server sent after the handshake's last reply, taken out of the buffer
        (normally nothing; the transmission core must parse whatever it is)."""
        return self._buf.take(len(self._buf)) or b""

    # --- steps: each returns the outcome, NEED_DATA, or None when it made progress ------

    def _finished(self) -> HandshakeEvent:
        assert self._result is not None
        return self._result

    def _made_progress(self) -> None:
        """After a reply was handled: the handshake is over once the goal has an outcome."""
        if self._result is not None:
            self.state = HandshakeState.FINISHED

    def _greeting(self) -> NeedData | None:
        raw = self._buf.take(GREETING.size)
        if raw is None:
            return NEED_DATA
        magic, second, flags = GREETING.unpack(raw)
        if magic != NBDMAGIC:
            raise ProtocolError(f"not an NBD server: greeting starts with {raw[:8]!r}")
        if second == CLISERV_MAGIC:
            raise ProtocolError("the server speaks the obsolete oldstyle handshake")
        if second != IHAVEOPT:
            raise ProtocolError(f"unknown handshake magic {second:#x} after NBDMAGIC")
        offered = HandshakeFlag(flags & (HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
        self._no_zeroes = HandshakeFlag.NO_ZEROES in offered
        self._out += CLIENT_FLAGS.pack(ClientFlag(int(offered)))
        self._start(fixed=HandshakeFlag.FIXED_NEWSTYLE in offered)
        self._made_progress()
        return None

    def _start(self, *, fixed: bool) -> None:
        if not self._goal.tls:
            self._start_goal(fixed=fixed)
        elif fixed:
            self._send(Opt.STARTTLS)
        else:
            reason = "the server is not fixed-newstyle, so it cannot speak TLS"
            self._refuse(Opt.STARTTLS, Rep.ERR_UNSUP, reason)

    def _start_goal(self, *, fixed: bool) -> None:
        if self._goal.export is None:
            if not fixed:
                self._refuse(Opt.LIST, Rep.ERR_UNSUP, "the server is not fixed-newstyle")
            else:
                self._send(Opt.LIST)
        elif not fixed:
            self._send_export_name()
        elif self._goal.structured:
            self._send(Opt.STRUCTURED_REPLY)
        else:
            self._send_go()

    def _send(self, option: Opt, data: bytes = b"") -> None:
        self._out += encode_option(option, data)
        self._option = option
        self.state = HandshakeState.OPTION_REPLY

    def _send_go(self) -> None:
        assert self._goal.export is not None
        if self._goal.export_name:
            return self._send_export_name()
        self._send(Opt.GO, encode_info_request(self._goal.export, WANTED_INFO))

    def _send_export_name(self) -> None:
        assert self._goal.export is not None
        self._out += encode_option(Opt.EXPORT_NAME, self._goal.export.encode())
        self._option = Opt.EXPORT_NAME
        self.state = HandshakeState.EXPORT_NAME_REPLY

    def _send_set_meta_context(self) -> None:
        assert self._goal.export is not None
        queries = b"".join(encode_name(name) for name in WANTED_CONTEXTS)
        query = encode_name(self._goal.export) + U32.pack(len(WANTED_CONTEXTS)) + queries
        self._send(Opt.SET_META_CONTEXT, query)

    def _refuse(self, option: Opt, reply: int, message: str) -> None:
        self._result = OptionRefused(option, reply, message)
        self._out += encode_option(Opt.ABORT)

    def _export_name_reply(self) -> NeedData | None:
        need = EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else EXPORT_NAME_PADDING)
        raw = self._buf.take(need)
        if raw is None:
            return NEED_DATA
        size, flags = EXPORT_NAME_REPLY.unpack(raw[: EXPORT_NAME_REPLY.size])
        self._opened(replace(self._info, size=size, flags=TxFlag(flags)))
        self._made_progress()
        return None

    # --- option replies ---------------------------------------------------------------

    def _option_reply(self) -> NeedData | None:
        if self._reply is None:
            raw = self._buf.take(OPTION_REPLY.size)
            if raw is None:
                return NEED_DATA
            self._reply = self._reply_header(raw)
        rtype, length = self._reply
        data = self._buf.take(length)
        if data is None:
            return NEED_DATA
        self._reply = None
        self._dispatch(rtype, data)
        self._made_progress()
        return None

    def _reply_header(self, raw: bytes) -> tuple[int, int]:
        magic, option, rtype, length = OPTION_REPLY.unpack(raw)
        if magic != OPTION_REPLY_MAGIC:
            raise ProtocolError(f"option reply with wrong magic {magic:#x}")
        if option != self._option:
            raise ProtocolError(f"reply to option {option} while {self._option!r} was asked")
        if length > MAX_OPTION_REPLY:
            raise ProtocolError(
                f"option reply of {length} bytes to {self._option!r} "
                f"(the limit is {MAX_OPTION_REPLY})"
            )
        return rtype, length

    def _dispatch(self, rtype: int, data: bytes) -> None:
        assert self._option is not None
        if rtype & REP_ERROR_BIT:
            return self._on_error(self._option, rtype, decode_string(data, "error message"))
        handler = self._handlers.get((self._option, rtype))
        if handler is None:
            raise ProtocolError(f"unexpected reply type {rtype} to {self._option!r}")
        handler(data)

    @functools.cached_property
    def _handlers(self) -> dict[tuple[Opt, int], Callable[[bytes], None]]:
        """The transition table: (option asked, reply type) -> what to do with the reply."""
        return {
            (Opt.STARTTLS, Rep.ACK): self._on_starttls,
            (Opt.STRUCTURED_REPLY, Rep.ACK): self._on_structured,
            (Opt.SET_META_CONTEXT, Rep.META_CONTEXT): self._on_meta_context,
            (Opt.SET_META_CONTEXT, Rep.ACK): lambda _: self._send_go(),
            (Opt.GO, Rep.INFO): self._on_info,
            (Opt.GO, Rep.ACK): self._on_go_ack,
            (Opt.INFO, Rep.INFO): self._on_info,
            (Opt.INFO, Rep.ACK): self._on_info_ack,
            (Opt.LIST, Rep.SERVER): self._on_server,
            (Opt.LIST, Rep.ACK): self._on_list_ack,
            (Opt.ABORT, Rep.ACK): lambda _: None,
        }

    def _on_error(self, option: Opt, rtype: int, message: str) -> None:
        if rtype == Rep.ERR_SHUTDOWN:  # the spec: the client MUST soft-disconnect (ABORT)
            return self._refuse(option, rtype, message)
        if rtype == Rep.ERR_TLS_REQD and option not in (Opt.INFO, Opt.GO):
            return self._refuse(option, rtype, message)  # nothing works without TLS
        if option is Opt.STRUCTURED_REPLY:
            return self._send_go()
        if option is Opt.SET_META_CONTEXT:
            self._contexts = {}
            return self._send_go()
        if option is Opt.GO and rtype == Rep.ERR_UNSUP:
            return self._send_export_name()
        if option is Opt.INFO:
            return self._next_info()
        self._refuse(option, rtype, message)

    def _on_starttls(self, data: bytes) -> None:
        if self._buf:
            raise ProtocolError(
                f"the server sent {len(self._buf)} bytes after accepting STARTTLS, before the "
                f"TLS handshake (TLS starts with the client): not TLS"
            )
        self.state = HandshakeState.TLS

    def _on_structured(self, data: bytes) -> None:
        self._structured = True
        self._send_set_meta_context()

    def _on_meta_context(self, data: bytes) -> None:
        if len(data) < 4:
            raise ProtocolError(f"META_CONTEXT reply of {len(data)} bytes")
        (context_id,) = U32.unpack(data[:4])
        name = decode_string(data[4:], "context name")
        if name not in WANTED_CONTEXTS or name in self._contexts:
            raise ProtocolError(
                f"META_CONTEXT reply for {printable(name[:64])!r}, which was not asked for "
                f"(or came again)"
            )
        self._contexts[name] = context_id

    def _on_info(self, data: bytes) -> None:
        if len(data) < 2:
            raise ProtocolError(f"INFO reply of {len(data)} bytes")
        self._info_replies += 1
        if self._info_replies > MAX_INFO_REPLIES:
            raise ProtocolError(f"more than {MAX_INFO_REPLIES} INFO replies to {self._option!r}")
        if self._goal.export is None:
            self._count_list_bytes(len(data))
        (itype,) = U16.unpack(data[:2])
        self._info = apply_info(self._info, itype, data)

    def _count_list_bytes(self, n: int) -> None:
        self._listing.bytes += n
        if self._listing.bytes > MAX_LIST_BYTES:
            raise ProtocolError(
                f"LIST and its INFO replies brought more than {MAX_LIST_BYTES} bytes"
            )

    def _on_go_ack(self, data: bytes) -> None:
        if self._info.size is None:
            raise ProtocolError("GO succeeded without NBD_INFO_EXPORT")
        self._opened(self._info)

    def _opened(self, info: ExportInfo) -> None:
        """Transmission has begun on ``info``: negotiated, or refused with a DISC."""
        assert info.size is not None
        if info.size > MAX_EXPORT_SIZE:
            reason = (
                f"export {info.name!r} is {info.size} bytes; blockfuse can use exports of up "
                f"to {MAX_EXPORT_SIZE} bytes (2^63 - 1: file sizes are signed 64-bit)"
            )
            self._result = ExportRefused(info, reason)
            self._out += REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0)
            return
        self._result = Negotiated(info, structured=self._structured, contexts=self._contexts)

    def _on_server(self, data: bytes) -> None:
        if len(data) < 4:
            raise ProtocolError(f"SERVER reply of {len(data)} bytes")
        (n,) = U32.unpack(data[:4])
        if n > len(data) - 4:
            raise ProtocolError(f"SERVER reply names {n} bytes but carries {len(data) - 4}")
        if len(self._listing.exports) >= MAX_EXPORTS:
            raise ProtocolError(f"LIST brought more than {MAX_EXPORTS} exports")
        self._count_list_bytes(len(data))
        name = decode_string(data[4 : 4 + n], "export name")
        desc = decode_string(data[4 + n :], "export description")
        self._listing.exports.append(ExportInfo(name, description=desc))

    def _on_list_ack(self, data: bytes) -> None:
        self._listing.index = -1
        self._next_info()

    def _next_info(self) -> None:
        listing = self._listing
        if 0 <= listing.index < len(listing.exports) and self._option is Opt.INFO:
            listing.exports[listing.index] = self._info
        listing.index += 1
        if not self._goal.details or listing.index >= len(listing.exports):
            self._result = ExportList(tuple(listing.exports))
            self._out += encode_option(Opt.ABORT)
            return
        self._info = listing.exports[listing.index]
        self._info_replies = 0
        self._send(Opt.INFO, encode_info_request(self._info.name, WANTED_INFO))

    def _on_info_ack(self, data: bytes) -> None:
        self._next_info()
