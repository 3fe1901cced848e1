"""The server side of NBD as a sans-io state machine: bytes in, events out; replies in,
bytes out.

The core answers the whole handshake by itself from the table of exports it was given
(the answers to each option are ``haggling.py``), and hands the layer above one event
per thing that needs a decision::

    S: NBDMAGIC IHAVEOPT FIXED_NEWSTYLE|NO_ZEROES        C: client flags
    C: option (16-byte header + data)                    S: option replies   (repeat)
         LIST, INFO, STRUCTURED_REPLY, *_META_CONTEXT, unknown (ERR_UNSUP): answered
         here, no event
         STARTTLS                   -> StartTLS          (ACK; TLS handshake; tls_started())
         GO / EXPORT_NAME           -> ServerReady       (transmission begins)
         ABORT                      -> ClientGone        (ACK sent; close)
         EXPORT_NAME, unknown name  -> Closing           (the protocol's only answer)
    C: request (28-byte header [+ WRITE payload])
         WRITE header               -> PayloadComing     (reserve room, then feed it)
         WRITE, payload with it     -> Request           (data: a view of what came)
         valid                      -> Request           (answer with send(reply))
         invalid                    -> RequestRefused    (answer with send(Reply(error)))
         DISC                       -> ClientGone        (answer what is in flight; close)

The states and the moves between them are one table (``TRANSITIONS``); each state has
one step (``_steps``) that returns an event, ``NEED_DATA``, or ``None`` once it made
progress.  Replies may be sent in any order and from any task (``send`` only encodes);
the layer above writes each message whole.

The invariant that keeps a hostile client harmless: every length is checked before
anything is buffered.  Option data is read only up to ``MAX_OPTION_DATA``; a longer
option is thrown away as it arrives and refused, so the stream stays in sync.  A WRITE
payload is held only up to the maximum payload; a longer one (up to
``MAX_REFUSED_PAYLOAD``) is thrown away and refused with EINVAL, and an absurd one breaks
the connection.  Every malformed input (wrong magic, flags not offered, an option other
than EXPORT_NAME from a client that is not fixed-newstyle, the connection closed mid-way)
raises ``ProtocolError``, and the core stays BROKEN: the connection must be dropped.

STARTTLS (with a ``tls`` policy other than OFF; the answers are ``haggling.py``'s) is a
state of its own, as in the client's core.  Once the ACK is queued the core returns
``START_TLS`` and takes no more bytes (``receive_data`` refuses them) until the layer
above has sent the ACK, run the TLS handshake on the same stream and called
``tls_started()``; the options after it are read from the TLS stream.  So nothing the
client sent before STARTTLS was answered is ever read as TLS: bytes that came after the
STARTTLS option, before its ACK left (the client must wait for the reply), are a
``ProtocolError`` and the ACK is never sent.  Whatever comes after the ACK is the TLS
layer's to judge::

    C: STARTTLS       S: ACK  -> START_TLS  (buffer empty, or ProtocolError)
    C: ClientHello .. S: ServerHello ..     (the layer above, within the handshake deadline)
                                 tls_started(): options forgotten, OPTION state again

Knobs let tests play older or stricter servers (no structured replies, no GO, not fixed
newstyle) and turn listing off; ``shut_down()`` makes every later option but ABORT
``ERR_SHUTDOWN``, as the spec asks of a server going away.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import ProtocolError
from .buffer import ReceiveBuffer
from .constants import (
    CLIENT_FLAGS,
    GREETING,
    IHAVEOPT,
    MAX_OPTION_DATA,
    MAX_REFUSED_PAYLOAD,
    NBDMAGIC,
    OPTION,
    REQUEST,
    REQUEST_MAGIC,
    Cmd,
    Errno,
    HandshakeFlag,
    Opt,
)
from .events import (
    NEED_DATA,
    START_TLS,
    ClientGone,
    Closing,
    ExportInfo,
    NeedData,
    PayloadComing,
    PeerClosed,
    Request,
    RequestRefused,
    ServerEvent,
    ServerReady,
    ServerReply,
    StartTLS,
)
from .haggling import Haggling, Knobs, TLSPolicy
from .replies import Part, Transmission, command_refusal, encode, range_refusal


class ServerState(enum.Enum):
    """What the core reads next."""

    __hash__ = object.__hash__  # Enum's is a Python call; states are looked up ~8 times a request

    CLIENT_FLAGS = "client flags"
    OPTION = "option header"
    OPTION_DATA = "option data"
    OPTION_SKIP = "oversized option data"
    TLS = "TLS handshake"
    REQUEST = "request header"
    WRITE_PAYLOAD = "write payload"
    PAYLOAD_SKIP = "oversized write payload"
    DONE = "done"
    BROKEN = "broken"


S = ServerState
TRANSITIONS: dict[ServerState, frozenset[ServerState]] = {
    S.CLIENT_FLAGS: frozenset({S.OPTION}),
    S.OPTION: frozenset({S.OPTION_DATA, S.OPTION_SKIP}),
    S.OPTION_DATA: frozenset({S.OPTION, S.TLS, S.REQUEST, S.DONE}),
    S.TLS: frozenset({S.OPTION}),
    S.OPTION_SKIP: frozenset({S.OPTION, S.DONE}),
    S.REQUEST: frozenset({S.REQUEST, S.WRITE_PAYLOAD, S.PAYLOAD_SKIP, S.DONE}),
    S.WRITE_PAYLOAD: frozenset({S.REQUEST}),
    S.PAYLOAD_SKIP: frozenset({S.REQUEST}),
    S.DONE: frozenset(),
}
"""Every move the core makes; any state may also become BROKEN."""


@dataclass
class Incoming:
    """The request whose payload is being read (or thrown away)."""

    cookie: int
    cmd: int
    flags: int
    offset: int
    length: int
    data: bytearray | None = None
    filled: int = 0
    diverted: bool = False
    """The layer above moves the payload itself (``divert_payload``)."""


class ServerCore:
    """One connection's server side; see the module text."""

    def __init__(
        self,
        exports: Iterable[ExportInfo],
        *,
        default: str | None = None,
        listing: bool = True,
        structured: bool = True,
        go: bool = True,
        fixed: bool = True,
        tls: TLSPolicy = TLSPolicy.OFF,
        allocate: Callable[[int], bytearray] = bytearray,
    ) -> None:
        """``exports`` in the order LIST shows them; ``default`` names the one that the
        empty name opens.  Each export's ``max_payload`` is enforced as advertised.
        ``allocate(n)`` gives a WRITE payload's buffer, of at least ``n`` bytes."""
        self._allocate = allocate
        knobs = Knobs(listing, structured, go, fixed, tls)
        self._haggling = Haggling(exports, default, knobs)
        self._offered = HandshakeFlag.NO_ZEROES
        if fixed:
            self._offered |= HandshakeFlag.FIXED_NEWSTYLE
        self._buf = ReceiveBuffer()
        self._out = bytearray(GREETING.pack(NBDMAGIC, IHAVEOPT, self._offered))
        self.state = ServerState.CLIENT_FLAGS
        self._fixed = self._eof = False
        self._option: tuple[int, int] = (0, 0)  # option, length being read
        self._skip = 0
        self._incoming: Incoming | None = None
        self.in_flight = 0
        """Requests handed out (``Request``/``RequestRefused``) and not answered yet."""
        self._usable: set[tuple[int, int]] = set()
        """(command, flags) pairs already found usable on this connection."""
        self._steps: dict[ServerState, Callable[[], ServerEvent | NeedData | None]] = {
            S.CLIENT_FLAGS: self._client_flags,
            S.OPTION: self._option_header,
            S.OPTION_DATA: self._option_data,
            S.OPTION_SKIP: self._option_skip,
            S.TLS: lambda: START_TLS,
            S.REQUEST: self._request,
            S.WRITE_PAYLOAD: self._write_payload,
            S.PAYLOAD_SKIP: self._payload_skip,
            S.DONE: self._done,
        }
        """The dispatch table: what ``next_event`` does in each state."""

    @property
    def structured(self) -> bool:
        return self._haggling.structured

    @property
    def transmission(self) -> Transmission | None:
        """What was negotiated, once transmission began."""
        return self._haggling.transmission

    @property
    def encrypted(self) -> bool:
        """TLS is on: ``tls_started()`` was called."""
        return self._haggling.encrypted

    def tls_started(self) -> None:
        """The TLS handshake that ``START_TLS`` asked for succeeded: forget what options
        negotiated (the spec) and read options again, now from the TLS stream."""
        if self.state is not ServerState.TLS:
            raise RuntimeError(f"tls_started() while reading the {self.state.value}")
        self._haggling.tls_started()
        self._goto(S.OPTION)

    def shut_down(self) -> None:
        """The server is going away: every later option but ABORT gets ERR_SHUTDOWN."""
        self._haggling.shutting_down = True

    # --- the sans-io surface ------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the client; ``b""`` means it closed the connection.  Refused
        (``RuntimeError``) while the TLS handshake is due: those bytes are TLS's."""
        if self.state is ServerState.TLS:
            raise RuntimeError("the TLS handshake is due: plaintext bytes are not taken")
        if not data:
            self._eof = True
        elif self.state is not ServerState.DONE:  # after ABORT/DISC input is ignored
            self._buf.feed(data)

    def data_to_send(self) -> bytes:
        """The handshake's replies so far (transmission replies come from ``send``)."""
        self._out += self._haggling.out
        self._haggling.out.clear()
        out, self._out = bytes(self._out), bytearray()
        return out

    def next_event(self) -> ServerEvent | NeedData:
        """The next event, or ``NEED_DATA``; raises ``ProtocolError`` (and stays broken)."""
        if self.state is ServerState.BROKEN:
            raise ProtocolError("the client already broke the protocol")
        try:
            while (event := self._steps[self.state]()) is None:
                pass
        except ProtocolError:
            self.state = ServerState.BROKEN
            raise
        if event is NEED_DATA and self._eof and self.state is not ServerState.DONE:
            raise self._closed()
        return event

    def _closed(self) -> PeerClosed:
        at_rest = not len(self._buf) and self.state in (S.OPTION, S.REQUEST)
        if at_rest and self.state is S.REQUEST:
            why = "without NBD_CMD_DISC"
        elif at_rest:
            why = "during the handshake"
        else:
            why = f"in the middle of the {self.state.value}"
        self.state = ServerState.BROKEN
        return PeerClosed(f"the client closed the connection {why}")

    def payload_target(self) -> memoryview | None:
        """Where the rest of a WRITE's payload goes, while nothing is buffered: the layer
        above may receive into it and report ``payload_received`` (no copy)."""
        w = self._incoming
        if self.state is not ServerState.WRITE_PAYLOAD or len(self._buf) or w is None:
            return None
        if w.diverted:
            return None
        return memoryview(self._payload_buffer(w))[w.filled : w.length]

    def payload_received(self, n: int) -> None:
        """``n`` more bytes of the payload were received past the core: into
        ``payload_target``, or wherever a diverted payload goes."""
        w = self._incoming
        assert w is not None and 0 < n <= w.length - w.filled
        assert w.diverted or self.payload_target() is not None
        w.filled += n

    def incoming_write(self) -> Request | None:
        """After ``PayloadComing`` and before any of its payload was taken: the WRITE as
        the ``Request`` it will be (its ``data`` empty), or ``None`` if it will be
        refused.  Nothing changes (but the cache of command flags found valid)."""
        w = self._incoming
        if self.state is not ServerState.WRITE_PAYLOAD or w is None:
            return None
        if w.filled or w.data is not None:  # the core has begun to take the payload
            return None
        if self._refusal(w) is not None:
            return None
        return Request(w.cookie, w.cmd, w.flags, w.offset, w.length, b"")

    def divert_payload(self) -> Request:
        """Hand out the WRITE ``incoming_write`` named now, its payload the layer
        above's to move: the bytes already buffered (``buffered_payload``), then the rest
        read past the core, each piece reported (``payload_received``).  Once
        ``payload_left`` is 0 the core reads the next request."""
        req = self.incoming_write()
        assert req is not None and self._incoming is not None, "no WRITE to divert"
        self._incoming.diverted = True
        self.in_flight += 1
        return req

    def buffered_payload(self) -> memoryview | None:
        """The next buffered piece of a diverted payload (counted as received), or
        ``None`` when nothing more of it is buffered."""
        w = self._incoming
        assert w is not None and w.diverted
        piece = self._buf.take_some(w.length - w.filled)
        if piece is not None:
            w.filled += len(piece)
        return piece

    @property
    def payload_left(self) -> int:
        """Bytes of the current WRITE's payload not yet received."""
        w = self._incoming
        return 0 if w is None else w.length - w.filled

    def send(self, reply: ServerReply) -> list[Part]:
        """The message answering one request, as parts to write whole, in order."""
        if self.transmission is None:
            raise RuntimeError("replies need a negotiated transmission")
        self.in_flight = max(0, self.in_flight - 1)
        return encode(reply, self.structured)

    @property
    def transmitting(self) -> bool:
        return self.transmission is not None and self.state is not ServerState.BROKEN

    @property
    def at_rest(self) -> bool:
        """Between messages: nothing of the next one has arrived."""
        return self.state in (S.OPTION, S.REQUEST) and not len(self._buf)

    # --- moves ----------------------------------------------------------------------------

    def _goto(self, state: ServerState) -> None:
        assert state in TRANSITIONS[self.state], f"{self.state} -> {state}"
        self.state = state

    def _done(self) -> NeedData:
        return NEED_DATA

    # --- handshake ------------------------------------------------------------------------

    def _client_flags(self) -> NeedData | None:
        raw = self._buf.take(CLIENT_FLAGS.size)
        if raw is None:
            return NEED_DATA
        (flags,) = CLIENT_FLAGS.unpack(raw)
        if flags & ~int(self._offered):  # int: ~ of an IntFlag keeps only its own bits
            raise ProtocolError(f"client flags {flags:#x} beyond the offered {self._offered:#x}")
        self._fixed = bool(flags & HandshakeFlag.FIXED_NEWSTYLE)
        self._haggling.no_zeroes = bool(flags & HandshakeFlag.NO_ZEROES)
        self._goto(S.OPTION)
        return None

    def _option_header(self) -> NeedData | None:
        raw = self._buf.take(OPTION.size)
        if raw is None:
            return NEED_DATA
        magic, option, length = OPTION.unpack(raw)
        if magic != IHAVEOPT:
            raise ProtocolError(f"option header with wrong magic {magic:#x}")
        if not self._fixed and option != Opt.EXPORT_NAME:
            raise ProtocolError(f"option {option} from a client that is not fixed-newstyle")
        self._option = (option, length)
        if length > MAX_OPTION_DATA:
            self._skip = length
            self._goto(S.OPTION_SKIP)
        else:
            self._goto(S.OPTION_DATA)
        return None

    def _option_data(self) -> ServerEvent | NeedData | None:
        data = self._buf.take(self._option[1])
        if data is None:
            return NEED_DATA
        return self._after_option(self._haggling.answer(self._option[0], data))

    def _option_skip(self) -> ServerEvent | NeedData | None:
        while self._skip:
            piece = self._buf.take_some(self._skip)
            if piece is None:
                return NEED_DATA
            self._skip -= len(piece)
        return self._after_option(self._haggling.oversized(*self._option))

    def _after_option(self, event: ServerEvent | None) -> ServerEvent | None:
        if isinstance(event, ServerReady):
            self._goto(S.REQUEST)
        elif isinstance(event, StartTLS):
            self._start_tls()
        elif isinstance(event, ClientGone | Closing):
            self._goto(S.DONE)
        else:
            self._goto(S.OPTION)
        return event

    def _start_tls(self) -> None:
        if len(self._buf):
            self._haggling.out.clear()  # the ACK is never sent
            raise ProtocolError(
                f"the client sent {len(self._buf)} bytes after NBD_OPT_STARTTLS before its "
                f"reply: they cannot be TLS (the TLS handshake starts after the reply)"
            )
        self._goto(S.TLS)

    # --- transmission ---------------------------------------------------------------------

    def _request(self) -> ServerEvent | NeedData | None:
        raw = self._buf.take(REQUEST.size)
        if raw is None:
            return NEED_DATA
        magic, flags, cmd, cookie, offset, length = REQUEST.unpack(raw)
        if magic != REQUEST_MAGIC:
            raise ProtocolError(f"request with wrong magic {magic:#010x}")
        if cmd == Cmd.DISC:
            self._goto(S.DONE)
            return ClientGone()
        incoming = Incoming(cookie, cmd, flags, offset, length)
        if cmd != Cmd.WRITE or length == 0:
            return self._hand_out(incoming)
        if length > MAX_REFUSED_PAYLOAD:
            raise ProtocolError(f"WRITE payload of {length} bytes")
        if length <= self._max_payload and (payload := self._buf.take_whole(length)):
            return self._hand_out(incoming, payload)  # it came with its header
        self._incoming = incoming
        if length > self._max_payload:
            self._skip = length
            self._goto(S.PAYLOAD_SKIP)
            return None
        self._goto(S.WRITE_PAYLOAD)
        return PayloadComing(cookie, length)

    @property
    def _max_payload(self) -> int:
        assert self.transmission is not None
        return self.transmission.export.max_payload

    def _payload_buffer(self, w: Incoming) -> bytearray:
        if w.data is None:  # only now: room was reserved after PayloadComing
            w.data = self._allocate(w.length)
        return w.data

    def _write_payload(self) -> ServerEvent | NeedData | None:
        w = self._incoming
        assert w is not None
        if w.diverted:  # handed out already; the layer above moves the payload
            if w.filled < w.length:
                return NEED_DATA
            self._incoming = None
            self._goto(S.REQUEST)
            return None
        buffer = self._payload_buffer(w)
        while w.filled < w.length:
            piece = self._buf.take_some(w.length - w.filled)
            if piece is None:
                return NEED_DATA
            buffer[w.filled : w.filled + len(piece)] = piece
            w.filled += len(piece)
        self._incoming = None
        self._goto(S.REQUEST)
        return self._hand_out(w)

    def _payload_skip(self) -> ServerEvent | NeedData | None:
        while self._skip:
            piece = self._buf.take_some(self._skip)
            if piece is None:
                return NEED_DATA
            self._skip -= len(piece)
        w = self._incoming
        assert w is not None
        self._incoming = None
        self._goto(S.REQUEST)
        self.in_flight += 1
        limit = self._max_payload
        message = f"WRITE of {w.length} bytes exceeds the maximum {limit}"
        return RequestRefused(w.cookie, w.cmd, Errno.EINVAL, message)

    def _hand_out(self, w: Incoming, payload: memoryview | None = None) -> Request | RequestRefused:
        """The request, its WRITE payload in ``payload`` or else in ``w.data``."""
        self.in_flight += 1
        refused = self._refusal(w)
        if refused is not None:
            return RequestRefused(w.cookie, w.cmd, *refused)
        if payload is not None:
            return Request(w.cookie, w.cmd, w.flags, w.offset, w.length, payload)
        data = memoryview(w.data)[: w.length] if w.data is not None else b""
        return Request(w.cookie, w.cmd, w.flags, w.offset, w.length, data)

    def _refusal(self, w: Incoming) -> tuple[int, str] | None:
        """Why the request is refused (NBD error, message), or ``None``."""
        t = self.transmission
        assert t is not None
        refused = None
        if (w.cmd, w.flags) not in self._usable:
            refused = command_refusal(t, w.cmd, w.flags)
            if refused is None:
                self._usable.add((w.cmd, w.flags))
        return refused or range_refusal(t, w.cmd, w.offset, w.length)
