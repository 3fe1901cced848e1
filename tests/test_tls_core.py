"""STARTTLS in the sans-io client handshake: what is sent, when it waits, what it forgets,
what a refusal leads to.  The server's side is written out byte by byte here (the server
core does not speak TLS), and every stream is also fed one byte at a time."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockfuse.errors import ProtocolError
from blockfuse.nbd import constants as c
from blockfuse.nbd.events import (
    NEED_DATA,
    START_TLS,
    Negotiated,
    OptionRefused,
)
from blockfuse.nbd.handshake import ClientHandshake
from blockfuse.nbd.options import encode_info_request, encode_name, encode_option
from blockfuse.transport.handshake import refusal_message

from .nbdpair import feed

BYTEWISE = pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])

GREETING = c.GREETING.pack(c.NBDMAGIC, c.IHAVEOPT, 3)
SIZE = 1 << 20
FLAGS = c.TxFlag.HAS_FLAGS | c.TxFlag.SEND_FLUSH


def reply(option: c.Opt, rtype: int, data: bytes = b"") -> bytes:
    return c.OPTION_REPLY.pack(c.OPTION_REPLY_MAGIC, option, rtype, len(data)) + data


def info_export() -> bytes:
    return reply(c.Opt.GO, c.Rep.INFO, c.INFO_EXPORT.pack(c.InfoType.EXPORT, SIZE, FLAGS))


def meta_context(context_id: int) -> bytes:
    data = c.U32.pack(context_id) + c.BASE_ALLOCATION.encode()
    return reply(c.Opt.SET_META_CONTEXT, c.Rep.META_CONTEXT, data)


def set_meta_context(export: str) -> bytes:
    query = encode_name(export) + c.U32.pack(1) + encode_name(c.BASE_ALLOCATION)
    return encode_option(c.Opt.SET_META_CONTEXT, query)


def go(export: str) -> bytes:
    wanted = (c.InfoType.BLOCK_SIZE, c.InfoType.NAME, c.InfoType.DESCRIPTION)
    return encode_option(c.Opt.GO, encode_info_request(export, wanted))


def at_starttls(hs: ClientHandshake, bytewise: bool) -> None:
    """Greet, check that STARTTLS goes out first and alone, accept it."""
    feed(hs, GREETING, bytewise)
    assert hs.next_event() is NEED_DATA
    assert hs.data_to_send() == c.CLIENT_FLAGS.pack(3) + encode_option(c.Opt.STARTTLS)
    feed(hs, reply(c.Opt.STARTTLS, c.Rep.ACK), bytewise)
    assert hs.next_event() is START_TLS
    assert hs.data_to_send() == b""


@BYTEWISE
def test_starttls_goes_first_and_the_handshake_waits_for_tls(bytewise: bool) -> None:
    hs = ClientHandshake.go("disk", tls=True)
    at_starttls(hs, bytewise)
    assert hs.next_event() is START_TLS  # still, until tls_started()
    with pytest.raises(RuntimeError, match="TLS handshake is due"):
        hs.receive_data(b"\x16\x03\x03")  # plaintext is never read once STARTTLS is ACKed


@BYTEWISE
def test_after_tls_every_option_is_negotiated_again(bytewise: bool) -> None:
    hs = ClientHandshake.go("disk", tls=True)
    at_starttls(hs, bytewise)
    hs.tls_started()
    assert hs.data_to_send() == encode_option(c.Opt.STRUCTURED_REPLY)
    feed(hs, reply(c.Opt.STRUCTURED_REPLY, c.Rep.ACK), bytewise)
    assert hs.next_event() is NEED_DATA
    assert hs.data_to_send() == set_meta_context("disk")
    feed(hs, meta_context(5) + reply(c.Opt.SET_META_CONTEXT, c.Rep.ACK), bytewise)
    assert hs.next_event() is NEED_DATA
    assert hs.data_to_send() == go("disk")
    feed(hs, info_export() + reply(c.Opt.GO, c.Rep.ACK), bytewise)
    outcome = hs.next_event()
    assert isinstance(outcome, Negotiated)
    assert outcome.structured and outcome.contexts == {c.BASE_ALLOCATION: 5}
    assert outcome.export.size == SIZE and outcome.export.flags == FLAGS


def test_what_tls_negotiates_is_what_counts() -> None:
    """Structured replies are only what the server says after TLS (here: no)."""
    hs = ClientHandshake.go("disk", tls=True)
    at_starttls(hs, False)
    hs.tls_started()
    hs.data_to_send()
    feed(hs, reply(c.Opt.STRUCTURED_REPLY, c.Rep.ERR_UNSUP), False)
    assert hs.next_event() is NEED_DATA
    assert hs.data_to_send() == go("disk")
    feed(hs, info_export() + reply(c.Opt.GO, c.Rep.ACK), False)
    outcome = hs.next_event()
    assert isinstance(outcome, Negotiated) and not outcome.structured and not outcome.contexts


@BYTEWISE
def test_listing_over_tls(bytewise: bool) -> None:
    hs = ClientHandshake.list(details=False, tls=True)
    at_starttls(hs, bytewise)
    hs.tls_started()
    assert hs.data_to_send() == encode_option(c.Opt.LIST)


@BYTEWISE
@pytest.mark.parametrize(
    "refusal", [c.Rep.ERR_POLICY, c.Rep.ERR_UNSUP, c.Rep.ERR_INVALID, c.Rep.ERR_SHUTDOWN]
)
def test_a_refused_starttls_never_falls_back_to_plaintext(bytewise: bool, refusal: int) -> None:
    """nbdkit without --tls answers ERR_POLICY; whatever the answer, ABORT is all that follows."""
    hs = ClientHandshake.go("disk", tls=True)
    feed(hs, GREETING, bytewise)
    hs.next_event()
    hs.data_to_send()
    feed(hs, reply(c.Opt.STARTTLS, refusal, b"TLS not enabled"), bytewise)
    assert hs.next_event() == OptionRefused(c.Opt.STARTTLS, refusal, "TLS not enabled")
    assert hs.data_to_send() == encode_option(c.Opt.ABORT)


@BYTEWISE
def test_bytes_after_the_starttls_ack_are_not_tls(bytewise: bool) -> None:
    """TLS starts with the client's hello: a server that sends anything first is not
    speaking TLS, and those bytes are neither handed to TLS nor parsed as NBD."""
    hs = ClientHandshake.go("disk", tls=True)
    feed(hs, GREETING, bytewise)
    hs.next_event()
    hs.data_to_send()
    sneaked = reply(c.Opt.STRUCTURED_REPLY, c.Rep.ACK)
    feed(hs, reply(c.Opt.STARTTLS, c.Rep.ACK) + sneaked, bytewise)
    with pytest.raises(ProtocolError, match="sent 20 bytes after accepting STARTTLS"):
        hs.next_event()
    with pytest.raises(ProtocolError, match="already failed"):
        hs.next_event()


def test_a_server_that_is_not_fixed_newstyle_cannot_speak_tls() -> None:
    hs = ClientHandshake.go("disk", tls=True)
    hs.receive_data(c.GREETING.pack(c.NBDMAGIC, c.IHAVEOPT, 0))
    outcome = hs.next_event()
    assert isinstance(outcome, OptionRefused) and outcome.option is c.Opt.STARTTLS
    assert "not fixed-newstyle" in outcome.message
    sent = hs.data_to_send()
    assert sent == c.CLIENT_FLAGS.pack(0) + encode_option(c.Opt.ABORT)  # no EXPORT_NAME


@pytest.mark.parametrize(
    ("hs", "option"),
    [
        (ClientHandshake.go("disk"), c.Opt.STRUCTURED_REPLY),
        (ClientHandshake.list(), c.Opt.LIST),
    ],
    ids=["go", "list"],
)
def test_a_plaintext_client_stops_at_tls_required(hs: ClientHandshake, option: c.Opt) -> None:
    """A TLS-only server (nbdkit --tls=require) answers every option so; nothing will
    work without TLS, so the first one ends the handshake."""
    hs.receive_data(GREETING)
    hs.next_event()
    assert hs.data_to_send() == c.CLIENT_FLAGS.pack(3) + encode_option(option)
    hs.receive_data(reply(option, c.Rep.ERR_TLS_REQD))
    assert hs.next_event() == OptionRefused(option, c.Rep.ERR_TLS_REQD, "")
    assert hs.data_to_send() == encode_option(c.Opt.ABORT)


def test_tls_started_out_of_turn_is_a_local_error() -> None:
    hs = ClientHandshake.go("disk", tls=True)
    with pytest.raises(RuntimeError, match=r"tls_started\(\) while greeting"):
        hs.tls_started()
    at_starttls(hs, False)
    hs.tls_started()
    with pytest.raises(RuntimeError, match="while waiting for an option reply"):
        hs.tls_started()


def test_refusals_say_what_to_do() -> None:
    refusal = OptionRefused(c.Opt.STARTTLS, c.Rep.ERR_POLICY, "TLS\nnot enabled")
    assert refusal_message(refusal, "h:10809", "disk", tls=True) == (
        "h:10809 does not offer TLS (NBD_REP_ERR_POLICY to NBD_OPT_STARTTLS: TLS\\nnot "
        "enabled); an nbds URI never falls back to plaintext"
    )
    required = OptionRefused(c.Opt.STRUCTURED_REPLY, c.Rep.ERR_TLS_REQD, "")
    assert refusal_message(required, "unix:/s", "disk") == (
        "unix:/s requires TLS (NBD_REP_ERR_TLS_REQD): use an nbds:// or nbds+unix:// URI"
    )
    over_tls = OptionRefused(c.Opt.GO, c.Rep.ERR_TLS_REQD, "")
    assert refusal_message(over_tls, "unix:/s", "disk", tls=True) == (
        "unix:/s refused export 'disk' (NBD_REP_ERR_TLS_REQD)"
    )


STARTS = st.sampled_from(
    [b"", reply(c.Opt.STARTTLS, c.Rep.ACK), reply(c.Opt.STARTTLS, c.Rep.ERR_POLICY, b"no")]
)


@settings(max_examples=300, deadline=None)
@given(st.tuples(STARTS, st.binary(max_size=100)).map(b"".join))
def test_any_reply_to_starttls_is_an_outcome_a_wait_or_a_protocol_error(data: bytes) -> None:
    hs = ClientHandshake.go("disk", tls=True)
    hs.receive_data(GREETING)
    assert hs.next_event() is NEED_DATA
    try:
        hs.receive_data(data)
        event = hs.next_event()
    except ProtocolError:
        return
    assert event is NEED_DATA or event is START_TLS or isinstance(event, OptionRefused)
    if event is START_TLS:  # only after exactly an ACK to STARTTLS, with nothing after it
        magic, option, rtype, length = c.OPTION_REPLY.unpack(data[:20])
        assert (magic, option, rtype) == (c.OPTION_REPLY_MAGIC, c.Opt.STARTTLS, c.Rep.ACK)
        assert len(data) == 20 + length
