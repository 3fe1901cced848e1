"""What the NBD cores hand to the layer above: frozen records, one per happening.

Each is a ``message``: frozen to the type checker, a plain dataclass at run time.  A
frozen dataclass's ``__init__`` sets every field through ``object.__setattr__``, which
cost 1.4 µs for a six-field ``Request`` against 0.26 µs (CPython 3.11, the 2-core dev
VM), and a request makes two or three records on the server and as many on the
client: several per cent of a 4 KiB request.  mypy --strict refuses an assignment to a
field as it did; equality and hashing are the frozen ones."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final, TypeVar, dataclass_transform

from ..errors import ProtocolError
from ..filerange import FileRange
from .constants import DEFAULT_MAX_PAYLOAD, NO_TX_FLAGS, Opt, Rep, TxFlag

T = TypeVar("T")


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def message(cls: type[T]) -> type[T]:
    """``cls`` as a dataclass that the type checker holds frozen (see above why only it)."""
    return dataclass(unsafe_hash=True)(cls)


class NeedData(enum.Enum):
    """The type of ``NEED_DATA``: a sentinel that is a type of its own, as h11's is.

    h11 makes each sentinel a class that is its own type; a one-member Enum does the
    same, and type checkers narrow ``event is NEED_DATA`` on it, so a core's
    ``next_event() -> SomeEvent | NeedData`` needs no casts at its callers."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA
"""``next_event()`` answers this when it cannot go on without more bytes."""


class PeerClosed(ProtocolError):
    """The peer closed the connection where the protocol expected more (a hard disconnect)."""


@message
class ExportInfo:
    """One export as the server describes it (``NBD_INFO_*`` or ``NBD_REP_SERVER``)."""

    name: str
    size: int | None = None
    flags: TxFlag = NO_TX_FLAGS
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = DEFAULT_MAX_PAYLOAD
    block_size_given: bool = False

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TxFlag.READ_ONLY)


# --- handshake --------------------------------------------------------------------------


@message
class Negotiated:
    """The handshake is over; transmission starts with these parameters."""

    export: ExportInfo
    structured: bool
    contexts: dict[str, int] = field(default_factory=dict)
    """Selected metadata contexts by name -> the id the server gave them."""


@message
class ExportList:
    """The answer to ``NBD_OPT_LIST`` (with ``NBD_OPT_INFO`` details where asked)."""

    exports: tuple[ExportInfo, ...]


@message
class OptionRefused:
    """The server answered ``option`` with error ``reply``; the handshake is over."""

    option: Opt
    reply: int
    message: str

    @property
    def reply_name(self) -> str:
        try:
            return Rep(self.reply).name
        except ValueError:
            return f"error {self.reply:#x}"


@message
class ExportRefused:
    """We refuse the export the server opened (``reason`` says why); transmission had
    begun, so the handshake's last bytes to send are ``NBD_CMD_DISC``."""

    export: ExportInfo
    reason: str


HandshakeEvent = Negotiated | ExportList | OptionRefused | ExportRefused
"""How a handshake ends."""


@message
class StartTLS:
    """``NBD_OPT_STARTTLS`` was accepted (the client's core: the server's ACK arrived; the
    server's core: its ACK is in ``data_to_send``): the TLS handshake comes next, on the
    same stream, before anything else is sent or read; then ``tls_started()`` goes on.
    Not an outcome: the handshake waits for it."""


START_TLS: Final = StartTLS()

# --- transmission (client side) -------------------------------------------------------


@message
class ReadData:
    """Part of a READ's answer: ``data`` belongs at absolute byte ``offset``."""

    cookie: int
    offset: int
    data: memoryview


@message
class ReadHole:
    """Part of a READ's answer: ``length`` bytes from ``offset`` read as zeroes."""

    cookie: int
    offset: int
    length: int


@message
class BlockStatus:
    """One metadata context's extents ``(length, flags)`` from the request's offset on."""

    cookie: int
    context: int
    extents: tuple[tuple[int, int], ...]


@message
class Done:
    """The request is answered; ``error`` 0 means it succeeded."""

    cookie: int
    error: int = 0
    message: str = ""


ReplyEvent = ReadData | ReadHole | BlockStatus | Done

# --- server side: what the server core reads -------------------------------------------


@message
class ServerReady:
    """The client opened ``export``; requests follow.  ``allocation``: the client selected
    ``base:allocation`` for it (BLOCK_STATUS may follow)."""

    export: ExportInfo
    structured: bool
    allocation: bool = False


@message
class PayloadComing:
    """A WRITE's header arrived and ``length`` bytes of payload follow.  The layer above
    may reserve room for them before it feeds more data: the core keeps them (up to the
    maximum payload) until it hands out the ``Request``.  A WRITE whose payload was
    buffered whole, in one piece fed, with its header comes as a ``Request`` at once
    (its ``data`` a view of that piece: no copy, and the piece lives as long as it)."""

    cookie: int
    length: int


@message
class Request:
    """A valid client request; ``data`` is a WRITE's payload (empty otherwise)."""

    cookie: int
    cmd: int
    flags: int
    offset: int
    length: int
    data: bytes | bytearray | memoryview = b""

    @property
    def end(self) -> int:
        return self.offset + self.length


@message
class RequestRefused:
    """A request the core refused by itself (unknown command or flag, bad range, too long,
    a write to a read-only export): answer it with ``error``.  Nothing reached a device."""

    cookie: int
    cmd: int
    error: int
    message: str


@message
class ClientGone:
    """The client ended the conversation (``NBD_OPT_ABORT`` or ``NBD_CMD_DISC``).  After a
    DISC the requests in flight still get their replies; then the connection closes."""


@message
class Closing:
    """The server must close the connection now, without a word (the only answer the
    protocol has to a refused ``NBD_OPT_EXPORT_NAME``); ``reason`` is for the log."""

    reason: str


ServerEvent = (
    ServerReady | PayloadComing | Request | RequestRefused | ClientGone | Closing | StartTLS
)

# --- server side: what the server core writes ------------------------------------------


@message
class Reply:
    """The answer to any request but a successful READ or BLOCK_STATUS: ``error`` 0 is
    success; an error's ``message`` goes out in an error chunk where replies are
    structured."""

    cookie: int
    error: int = 0
    message: str = ""


@message
class ReadReply:
    """A READ's answer from ``offset`` on: ``pieces`` in order, each either data (a
    buffer, or a ``FileRange`` that the transport sends from its file) or a hole (an
    ``int``, its length: reads as zeroes).  With ``error`` set, the pieces are what was
    read before the failure at ``error_offset`` (``None``: anywhere)."""

    cookie: int
    offset: int
    pieces: tuple[bytes | bytearray | memoryview | FileRange | int, ...]
    error: int = 0
    message: str = ""
    error_offset: int | None = None


@message
class StatusReply:
    """A BLOCK_STATUS answer for ``base:allocation``: ``(length, flags)`` extents from the
    request's offset on."""

    cookie: int
    extents: tuple[tuple[int, int], ...]


ServerReply = Reply | ReadReply | StatusReply
