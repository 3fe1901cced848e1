"""STARTTLS in the sans-io server core: the three policies, what it waits for, what it
forgets, what it refuses; the client's core against it; a fuzz with TLS required.

Each byte stream is also fed one byte at a time where that can change anything.
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockfuse.errors import ProtocolError
from blockfuse.nbd import constants as c
from blockfuse.nbd.constants import Opt, Rep
from blockfuse.nbd.events import (
    NEED_DATA,
    START_TLS,
    ClientGone,
    Closing,
    Negotiated,
    Reply,
    Request,
    RequestRefused,
    ServerReady,
    StartTLS,
)
from blockfuse.nbd.handshake import ClientHandshake
from blockfuse.nbd.server import ServerCore, ServerState, TLSPolicy

from .hostile_client import info_data, meta_data, option, option_replies, request
from .nbdpair import feed
from .test_nbd_server_core import BYTEWISE, FUZZ_STEPS, exports, flags, pieces

OFF, ON, REQUIRE = TLSPolicy.OFF, TLSPolicy.ON, TLSPolicy.REQUIRE
ACK = (Opt.STARTTLS, Rep.ACK, b"")


def new(tls: TLSPolicy) -> ServerCore:
    server = ServerCore(exports(), default="disk", tls=tls)
    assert server.data_to_send() == c.GREETING.pack(c.NBDMAGIC, c.IHAVEOPT, 3)
    return server


def answers(server: ServerCore, data: bytes, bytewise: bool = False) -> list[object]:
    """Feed ``data``; the events up to NEED_DATA or START_TLS, then the option replies sent
    (as ``(option, reply type, data)``), in one list."""
    events: list[object] = []
    for piece in [data[i : i + 1] for i in range(len(data))] if bytewise else [data]:
        feed(server, piece, False)
        while (event := server.next_event()) is not NEED_DATA:
            events.append(event)
            if event is START_TLS:
                break
    parsed, rest = option_replies(server.data_to_send())
    assert rest == b""
    return events + [(r.option, r.rtype, r.data) for r in parsed]


def started(server: ServerCore, bytewise: bool = False) -> None:
    """Greet, STARTTLS, ACK, and the TLS handshake (as if done by the layer above)."""
    assert answers(server, flags() + option(Opt.STARTTLS), bytewise) == [START_TLS, ACK]
    server.tls_started()
    assert server.encrypted and server.state is ServerState.OPTION


@BYTEWISE
def test_starttls_waits_for_the_tls_handshake_then_forgets_the_options(bytewise: bool) -> None:
    server = new(ON)
    got = answers(server, flags() + option(Opt.STRUCTURED_REPLY) + option(Opt.STARTTLS), bytewise)
    assert got == [START_TLS, (Opt.STRUCTURED_REPLY, Rep.ACK, b""), ACK]
    assert server.state is ServerState.TLS and not server.encrypted
    assert server.next_event() is START_TLS  # it keeps asking until TLS is up
    with pytest.raises(RuntimeError, match="plaintext bytes are not taken"):
        server.receive_data(b"\x16\x03\x01")
    server.tls_started()
    # structured replies were forgotten: SET_META_CONTEXT needs them again, and they can be
    # asked for again
    got = answers(server, option(Opt.SET_META_CONTEXT, meta_data("disk", "base:allocation")))
    assert [(o, r) for o, r, _ in got] == [(Opt.SET_META_CONTEXT, Rep.ERR_INVALID)]
    got = answers(server, option(Opt.STRUCTURED_REPLY), bytewise)
    assert got == [(Opt.STRUCTURED_REPLY, Rep.ACK, b"")]
    assert server.structured


def test_the_meta_context_chosen_before_tls_is_forgotten() -> None:
    server = new(ON)
    before = option(Opt.STRUCTURED_REPLY) + option(
        Opt.SET_META_CONTEXT, meta_data("disk", "base:allocation")
    )
    answers(server, flags() + before)
    assert answers(server, option(Opt.STARTTLS))[:1] == [START_TLS]
    server.tls_started()
    events = answers(server, option(Opt.STRUCTURED_REPLY) + option(Opt.GO, info_data("disk")))
    ready = events[0]
    assert isinstance(ready, ServerReady) and ready.structured and not ready.allocation


@pytest.mark.parametrize("tls", [ON, REQUIRE])
def test_a_second_starttls_is_invalid_and_one_with_data_too(tls: TLSPolicy) -> None:
    server = new(tls)
    got = answers(server, flags() + option(Opt.STARTTLS, b"x"))
    assert [(o, r) for o, r, _ in got] == [(Opt.STARTTLS, Rep.ERR_INVALID)]
    assert answers(server, option(Opt.STARTTLS, length=1 << 20) + bytes(1 << 20))[0][:2] == (
        Opt.STARTTLS,
        Rep.ERR_INVALID,
    )
    assert answers(server, option(Opt.STARTTLS)) == [START_TLS, ACK]
    server.tls_started()
    got = answers(server, option(Opt.STARTTLS) + option(Opt.LIST))
    assert [(o, r) for o, r, _ in got] == [
        (Opt.STARTTLS, Rep.ERR_INVALID),
        (Opt.LIST, Rep.SERVER),
        (Opt.LIST, Rep.SERVER),
        (Opt.LIST, Rep.ACK),
    ]


@BYTEWISE
def test_tls_required_refuses_every_option_but_starttls_and_abort(bytewise: bool) -> None:
    server = new(REQUIRE)
    asked = [
        option(Opt.LIST),
        option(Opt.STRUCTURED_REPLY),
        option(Opt.INFO, info_data("disk")),
        option(Opt.GO, info_data("disk")),
        option(Opt.LIST_META_CONTEXT, meta_data("disk")),
        option(Opt.SET_META_CONTEXT, meta_data("disk", "base:allocation")),
        option(99, b"unknown"),
        option(Opt.EXTENDED_HEADERS),
        option(Opt.GO, length=1 << 20) + bytes(1 << 20),  # skipped unread, refused alike
    ]
    got = answers(server, flags() + b"".join(asked), bytewise)
    assert [r for _, r, _ in got] == [Rep.ERR_TLS_REQD] * len(asked)
    assert got[0] == (
        Opt.LIST,
        Rep.ERR_TLS_REQD,
        b"this server requires TLS: send NBD_OPT_STARTTLS first",
    )
    assert server.state is ServerState.OPTION  # in sync: STARTTLS still works
    assert answers(server, option(Opt.STARTTLS)) == [START_TLS, ACK]
    server.tls_started()
    events = answers(server, option(Opt.GO, info_data("disk")), bytewise)
    assert isinstance(events[0], ServerReady) and server.transmitting


def test_tls_required_closes_on_a_plaintext_export_name_and_takes_abort() -> None:
    server = new(REQUIRE)
    assert answers(server, flags() + option(Opt.EXPORT_NAME, b"disk")) == [
        Closing("EXPORT_NAME without TLS, which this server requires")
    ]
    assert server.state is ServerState.DONE
    server = new(REQUIRE)
    assert answers(server, flags() + option(Opt.EXPORT_NAME, length=1 << 17) + bytes(1 << 17))[
        0
    ] == Closing(f"EXPORT_NAME of {1 << 17} bytes")
    server = new(REQUIRE)
    assert answers(server, flags() + option(Opt.ABORT)) == [ClientGone(), (Opt.ABORT, Rep.ACK, b"")]
    server = new(REQUIRE)
    started(server)
    feed(server, option(Opt.EXPORT_NAME, b"disk"), False)
    assert isinstance(server.next_event(), ServerReady)
    assert len(server.data_to_send()) == c.EXPORT_NAME_REPLY.size  # no padding: NO_ZEROES


@pytest.mark.parametrize("tls", [OFF, ON])
def test_without_tls_required_nothing_is_tls_reqd(tls: TLSPolicy) -> None:
    """The spec: a server that does not require TLS never sends ERR_TLS_REQD; without TLS
    STARTTLS is ERR_POLICY."""
    server = new(tls)
    asked = [
        option(Opt.LIST),
        option(Opt.STRUCTURED_REPLY),
        option(Opt.INFO, info_data("disk")),
        option(Opt.LIST_META_CONTEXT, meta_data("disk")),
    ]
    got = answers(server, flags() + b"".join(asked))
    assert Rep.ERR_TLS_REQD not in [r for _, r, _ in got]
    if tls is OFF:
        got = answers(server, option(Opt.STARTTLS))
        assert got == [(Opt.STARTTLS, Rep.ERR_POLICY, b"TLS is not configured on this server")]
    events = answers(server, option(Opt.GO, info_data("disk")))
    assert isinstance(events[0], ServerReady)


@pytest.mark.parametrize("sneaked", [b"\x16", b"\x16\x03\x01\x00\xa5" + bytes(40), option(Opt.GO)])
def test_bytes_after_starttls_before_its_reply_are_never_tls(sneaked: bytes) -> None:
    """A client that sends its ClientHello (or anything) before our ACK: the connection is
    dropped, and the ACK never leaves."""
    server = new(REQUIRE)
    feed(server, flags() + option(Opt.STARTTLS) + sneaked, False)
    with pytest.raises(ProtocolError, match=f"sent {len(sneaked)} bytes after NBD_OPT_STARTTLS"):
        server.next_event()
    assert server.data_to_send() == b""
    assert server.state is ServerState.BROKEN


def test_tls_started_only_when_due() -> None:
    server = new(ON)
    with pytest.raises(RuntimeError, match="tls_started"):
        server.tls_started()
    answers(server, flags())
    with pytest.raises(RuntimeError, match="tls_started"):
        server.tls_started()


def test_the_client_closing_while_tls_is_due_is_the_tls_layers_to_see() -> None:
    """While the handshake is due the core takes nothing, not even EOF: the TLS layer reads
    the stream then."""
    server = new(ON)
    answers(server, flags() + option(Opt.STARTTLS))
    with pytest.raises(RuntimeError):
        server.receive_data(b"")
    assert server.next_event() is START_TLS


def test_shutting_down_comes_before_tls_required() -> None:
    server = new(REQUIRE)
    server.shut_down()
    got = answers(server, flags() + option(Opt.LIST) + option(Opt.STARTTLS))
    assert [r for _, r, _ in got] == [Rep.ERR_SHUTDOWN, Rep.ERR_SHUTDOWN]


@BYTEWISE
@pytest.mark.parametrize("tls", [ON, REQUIRE])
def test_our_client_core_negotiates_tls_with_the_server_core(
    bytewise: bool, tls: TLSPolicy
) -> None:
    """Both cores back to back; the TLS layer between them is the identity here."""
    client = ClientHandshake.go("disk", tls=True)
    server = ServerCore(exports(), default="disk", tls=tls)
    outcome: object = NEED_DATA
    for _ in range(20):
        feed(server, client.data_to_send(), bytewise)
        event = server.next_event()
        feed(client, server.data_to_send(), bytewise)
        outcome = client.next_event()
        if isinstance(outcome, StartTLS):
            assert event is START_TLS  # both wait for TLS, nothing buffered on either side
            client.tls_started()
            server.tls_started()
        elif outcome is not NEED_DATA:
            break
    assert isinstance(event, ServerReady)
    assert isinstance(outcome, Negotiated), outcome
    assert outcome.structured and "base:allocation" in outcome.contexts and server.encrypted
    assert server.transmitting


# --- fuzz: with TLS required, any input is events or a protocol error, within a bound ------


def tls_pieces() -> st.SearchStrategy[bytes]:
    return st.one_of(pieces(), st.just(option(Opt.STARTTLS)), st.just(option(Opt.STARTTLS, b"x")))


def run_with_tls(server: ServerCore, require: bool) -> None:
    """Every event up to NEED_DATA; TLS "runs" at once when asked for (the rest of the
    stream is then what came over TLS)."""
    for _ in range(FUZZ_STEPS):
        event = server.next_event()
        if event is NEED_DATA:
            return
        if event is START_TLS:
            assert not len(server._buf)  # type: ignore[attr-defined]
            server.tls_started()
        elif isinstance(event, Request | RequestRefused):
            server.send(Reply(event.cookie))
        assert server.encrypted or not (require and server.transmitting), "no TLS"
    raise AssertionError(f"still yielding events after {FUZZ_STEPS} of them")


@settings(max_examples=300, deadline=None)
@given(st.lists(tls_pieces(), max_size=12), st.booleans(), st.integers(1, 40), st.booleans())
def test_fuzz_server_core_with_tls(
    parts: list[bytes], prefixed: bool, split: int, require: bool
) -> None:
    server = new(REQUIRE if require else ON)
    data = (flags() if prefixed else b"") + b"".join(parts)
    with contextlib.suppress(ProtocolError):
        for i in range(0, len(data), split):
            server.receive_data(data[i : i + split])
            run_with_tls(server, require)
        server.receive_data(b"")
        run_with_tls(server, require)


def test_a_request_is_never_read_before_tls_when_required() -> None:
    server = new(REQUIRE)
    got = answers(server, flags() + option(Opt.GO, info_data("disk")))
    assert [(o, r) for o, r, _ in got] == [(Opt.GO, Rep.ERR_TLS_REQD)]
    feed(server, request(c.Cmd.READ, 0, 512), False)
    with pytest.raises(ProtocolError, match="wrong magic"):
        server.next_event()
