"""The server's answers to options, one option at a time (the core reads them whole).

``Haggling.answer(option, data)`` writes the option's replies to ``out`` and returns
what the core must act on, if anything::

    GO, EXPORT_NAME     -> ServerReady   transmission begins (EXPORT_NAME: its reply too)
    ABORT               -> ClientGone    ACK sent; the connection closes (data ignored,
                                         however long)
    STARTTLS            -> StartTLS      ACK sent; the TLS handshake comes next
    EXPORT_NAME unknown -> Closing       the protocol has no error reply for it
    anything else       -> None          answered (ACK, data, or an error reply)

What the answers rest on: the exports (``default`` opens for the empty name), whether
structured replies are on (DF is advertised only then; meta contexts need them), and
the last SET_META_CONTEXT (BLOCK_STATUS is allowed only if it selected a context for the
export that GO then opened).  INFO and GO describe an export identically.  While the
server shuts down every option but ABORT gets ``ERR_SHUTDOWN`` (EXPORT_NAME: Closing).

TLS (``TLSPolicy``): ``OFF`` answers STARTTLS with ``ERR_POLICY`` and never says
``ERR_TLS_REQD`` (the spec forbids it then).  ``ON`` accepts STARTTLS and serves plaintext
clients too.  ``REQUIRE`` is the spec's FORCEDTLS: until TLS is on, every option but
STARTTLS and ABORT gets ``ERR_TLS_REQD`` (INFO and GO too: every export needs TLS), and a
plaintext EXPORT_NAME closes the connection.  Once TLS is on (``tls_started``) what the
options negotiated is forgotten (structured replies, the meta context), as the spec
asks, and a second STARTTLS is ``ERR_INVALID``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from .constants import (
    EXPORT_NAME_PADDING,
    EXPORT_NAME_REPLY,
    MAX_STRING,
    OPTION_REPLY,
    OPTION_REPLY_MAGIC,
    Opt,
    Rep,
    TxFlag,
)
from .events import START_TLS, ClientGone, Closing, ExportInfo, ServerEvent, ServerReady
from .queries import (
    BadOption,
    MetaRequest,
    context_reply,
    info_items,
    listed_contexts,
    parse_info_request,
    parse_meta_request,
    selected_contexts,
    server_entry,
)
from .replies import ALLOCATION_ID, Transmission

NO_TLS = "TLS is not configured on this server"
TLS_REQUIRED = "this server requires TLS: send NBD_OPT_STARTTLS first"
WITHOUT_TLS = (int(Opt.STARTTLS), int(Opt.ABORT))
"""The options a server that requires TLS answers before TLS is on."""


class TLSPolicy(enum.Enum):
    """Whether the server speaks TLS (``--tls``): see the module text."""

    OFF = "off"
    ON = "on"
    REQUIRE = "require"


@dataclass(frozen=True)
class Knobs:
    """How the server behaves: ``listing`` off is the ``--no-list`` policy (ERR_POLICY);
    ``tls`` the TLS policy; the other three off play older servers in tests."""

    listing: bool = True
    structured: bool = True
    go: bool = True
    fixed: bool = True
    tls: TLSPolicy = TLSPolicy.OFF


class Haggling:
    def __init__(self, exports: Iterable[ExportInfo], default: str | None, knobs: Knobs) -> None:
        self._exports = {e.name: e for e in exports}
        self._default = default
        self.knobs = knobs
        self.out = bytearray()
        self.structured = False
        self.no_zeroes = False
        self.shutting_down = False
        self.encrypted = False
        """TLS is on (STARTTLS was accepted and its handshake succeeded)."""
        self.transmission: Transmission | None = None
        self._option = 0
        self._meta: tuple[str, bool] | None = None  # last SET_META_CONTEXT: export, selected
        self._handlers: dict[int, Callable[[bytes], ServerEvent | None]] = {
            Opt.EXPORT_NAME: self._export_name,
            Opt.ABORT: self._abort,
            Opt.LIST: self._list,
            Opt.STARTTLS: self._starttls,
            Opt.INFO: self._info,
            Opt.GO: self._go,
            Opt.STRUCTURED_REPLY: self._structured_reply,
            Opt.LIST_META_CONTEXT: self._list_meta_context,
            Opt.SET_META_CONTEXT: self._set_meta_context,
        }
        """The table: option -> its handler; any other option is ``ERR_UNSUP``."""

    def answer(self, option: int, data: bytes) -> ServerEvent | None:
        """Answer one option whose data arrived whole."""
        self._option = option
        if self.shutting_down and option != Opt.ABORT:
            return self._refuse_shutting_down()
        if self._needs_tls(option):
            return self._refuse_without_tls()
        try:
            return self._handlers.get(option, self._unsupported)(data)
        except BadOption as exc:
            self._reply(exc.reply, str(exc).encode())
            return None

    def oversized(self, option: int, length: int) -> ServerEvent | None:
        """Answer an option whose data (``length`` bytes) was too long to read."""
        self._option = option
        if option == Opt.ABORT:  # its data is ignored, however long (the spec)
            return self._abort(b"")
        if option == Opt.EXPORT_NAME:
            return Closing(f"EXPORT_NAME of {length} bytes")
        if self._needs_tls(option):
            return self._refuse_without_tls()
        if option == Opt.STARTTLS and self.knobs.tls is not TLSPolicy.OFF:
            self._reply(Rep.ERR_INVALID, f"option {option} takes no data".encode())
            return None
        known = option in self._handlers and option != Opt.STARTTLS
        rtype = Rep.ERR_TOO_BIG if known else Rep.ERR_UNSUP
        self._reply(rtype, f"option data of {length} bytes is too long".encode())
        return None

    def _reply(self, rtype: int, data: bytes = b"") -> None:
        header = OPTION_REPLY.pack(OPTION_REPLY_MAGIC, self._option, rtype, len(data))
        self.out += header + data

    def _lookup(self, name: str) -> ExportInfo | None:
        if name == "" and self._default is not None and "" not in self._exports:
            name = self._default
        return self._exports.get(name)

    def _refuse_shutting_down(self) -> ServerEvent | None:
        if self._option == Opt.EXPORT_NAME:
            return Closing("EXPORT_NAME while the server shuts down")
        self._reply(Rep.ERR_SHUTDOWN, b"the server is shutting down")
        return None

    def _needs_tls(self, option: int) -> bool:
        return (
            self.knobs.tls is TLSPolicy.REQUIRE and not self.encrypted and option not in WITHOUT_TLS
        )

    def _refuse_without_tls(self) -> ServerEvent | None:
        if self._option == Opt.EXPORT_NAME:
            return Closing("EXPORT_NAME without TLS, which this server requires")
        self._reply(Rep.ERR_TLS_REQD, TLS_REQUIRED.encode())
        return None

    def tls_started(self) -> None:
        """TLS is on: forget what the options negotiated (the spec)."""
        self.encrypted = True
        self.structured = False
        self._meta = None

    def _unsupported(self, data: bytes) -> None:
        self._reply(Rep.ERR_UNSUP, f"option {self._option} is not supported".encode())

    def _no_data(self, data: bytes) -> None:
        if data:
            raise BadOption(Rep.ERR_INVALID, f"option {self._option} takes no data")

    # --- the options --------------------------------------------------------------------

    def _export_name(self, data: bytes) -> ServerEvent:
        name = data.decode("utf-8", errors="replace")
        found = self._lookup(name) if len(data) <= MAX_STRING else None
        if found is None:
            return Closing(f"EXPORT_NAME of unknown export {name[:64]!r}")
        ready = self._opened(found)
        self.out += EXPORT_NAME_REPLY.pack(found.size or 0, ready.export.flags)
        if not self.no_zeroes:
            self.out += bytes(EXPORT_NAME_PADDING)
        return ready

    def _abort(self, data: bytes) -> ServerEvent:
        self._reply(Rep.ACK)  # data, if any, is ignored (the spec)
        return ClientGone()

    def _list(self, data: bytes) -> None:
        self._no_data(data)
        if not self.knobs.listing:
            raise BadOption(Rep.ERR_POLICY, "listing exports is disabled on this server")
        for export in self._exports.values():
            self._reply(Rep.SERVER, server_entry(export))
        self._reply(Rep.ACK)

    def _starttls(self, data: bytes) -> ServerEvent:
        self._no_data(data)
        if self.knobs.tls is TLSPolicy.OFF:
            raise BadOption(Rep.ERR_POLICY, NO_TLS)
        if self.encrypted:
            raise BadOption(Rep.ERR_INVALID, "TLS is on already")
        self._reply(Rep.ACK)
        return START_TLS

    def _info(self, data: bytes) -> None:
        self._describe(data, "NBD_OPT_INFO")

    def _go(self, data: bytes) -> ServerEvent | None:
        if not self.knobs.go:
            self._unsupported(data)
            return None
        return self._opened(self._describe(data, "NBD_OPT_GO"))

    def _describe(self, data: bytes, what: str) -> ExportInfo:
        request = parse_info_request(data, what)
        found = self._lookup(request.name)
        if found is None:
            raise BadOption(Rep.ERR_UNKNOWN, f"no export named {request.name[:64]!r}")
        for item in info_items(self._advertised(found), request.wanted):
            self._reply(Rep.INFO, item)
        self._reply(Rep.ACK)
        return found

    def _structured_reply(self, data: bytes) -> None:
        if not self.knobs.structured:
            self._unsupported(data)
            return
        self._no_data(data)
        if self.structured:
            raise BadOption(Rep.ERR_INVALID, "structured replies are on already")
        self.structured = True
        self._reply(Rep.ACK)

    def _list_meta_context(self, data: bytes) -> None:
        request = self._meta_request(data, "NBD_OPT_LIST_META_CONTEXT")
        for name in listed_contexts(request.queries):
            self._reply(Rep.META_CONTEXT, context_reply(0, name))
        self._reply(Rep.ACK)

    def _set_meta_context(self, data: bytes) -> None:
        self._meta = None  # replaced even when this one fails
        request = self._meta_request(data, "NBD_OPT_SET_META_CONTEXT")
        selected = selected_contexts(request.queries)
        for name in selected:
            self._reply(Rep.META_CONTEXT, context_reply(ALLOCATION_ID, name))
        self._reply(Rep.ACK)
        found = self._lookup(request.name)
        assert found is not None
        self._meta = (found.name, bool(selected))

    def _meta_request(self, data: bytes, what: str) -> MetaRequest:
        if not self.structured:
            raise BadOption(Rep.ERR_INVALID, f"{what} before NBD_OPT_STRUCTURED_REPLY")
        request = parse_meta_request(data, what)
        if self._lookup(request.name) is None:
            raise BadOption(Rep.ERR_UNKNOWN, f"no export named {request.name[:64]!r}")
        return request

    def _advertised(self, export: ExportInfo) -> ExportInfo:
        """``export`` as this connection sees it: DF only with structured replies."""
        if self.structured:
            return export
        return replace(export, flags=export.flags & ~TxFlag.SEND_DF)

    def _opened(self, found: ExportInfo) -> ServerReady:
        export = self._advertised(found)
        allocation = self._meta == (found.name, True)
        self.transmission = Transmission(export, self.structured, allocation)
        return ServerReady(export, self.structured, allocation)
