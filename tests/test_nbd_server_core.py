"""The sans-io server core on its own: every option, every refusal, hostile input, fuzz.

Each byte stream is also fed one byte at a time (``BYTEWISE``); replies are checked as
raw bytes, or through the client core (which checks every chunk) where that says more.
"""

from __future__ import annotations

import contextlib
import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockfuse.errors import ProtocolError
from blockfuse.nbd import constants as c
from blockfuse.nbd.constants import Cmd, CmdFlag, Opt, Rep, TxFlag
from blockfuse.nbd.events import (
    NEED_DATA,
    ClientGone,
    Closing,
    Done,
    ExportInfo,
    Negotiated,
    PayloadComing,
    PeerClosed,
    ReadData,
    ReadHole,
    ReadReply,
    Reply,
    Request,
    RequestRefused,
    ServerReady,
    StatusReply,
)
from blockfuse.nbd.replies import encode
from blockfuse.nbd.server import ServerCore, ServerState
from blockfuse.nbd.transmission import ClientTransmission

from .hostile_client import info_data, meta_data, option, option_replies, request
from .nbdpair import drain, feed

BYTEWISE = pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
FLAGS = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA | TxFlag.SEND_TRIM | TxFlag.SEND_DF
FLAGS |= TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FAST_ZERO | TxFlag.SEND_CACHE
SIZE = 1 << 20
MAX = 1 << 16


def exports() -> list[ExportInfo]:
    return [
        ExportInfo("disk", SIZE, FLAGS, "the disk", max_payload=MAX, block_size_given=True),
        ExportInfo("ro", 4096, TxFlag.HAS_FLAGS | TxFlag.READ_ONLY, "read-only"),
    ]


def new(**kw: bool) -> ServerCore:
    server = ServerCore(exports(), default="disk", **kw)
    offered = 3 if kw.get("fixed", True) else 2
    assert server.data_to_send() == c.GREETING.pack(c.NBDMAGIC, c.IHAVEOPT, offered)
    return server


def pump(server: ServerCore, data: bytes, bytewise: bool = False) -> tuple[list[object], bytes]:
    """Feed ``data``; every event up to NEED_DATA, and what the server sent."""
    events: list[object] = []
    for piece in [data[i : i + 1] for i in range(len(data))] if bytewise else [data]:
        feed(server, piece, False)
        while (event := server.next_event()) is not NEED_DATA:
            events.append(event)
    return events, server.data_to_send()


def replies(
    server: ServerCore, data: bytes, bytewise: bool = False
) -> list[tuple[int, int, bytes]]:
    events, out = pump(server, data, bytewise)
    assert not events, events
    parsed, rest = option_replies(out)
    assert rest == b""
    return [(r.option, r.rtype, r.data) for r in parsed]


def flags(value: int = 3) -> bytes:
    return c.CLIENT_FLAGS.pack(value)


def structured(server: ServerCore, greeted: bool = False) -> None:
    data = (b"" if greeted else flags()) + option(Opt.STRUCTURED_REPLY)
    assert replies(server, data) == [(Opt.STRUCTURED_REPLY, Rep.ACK, b"")]


# --- handshake ------------------------------------------------------------------------------


def test_client_flags_beyond_the_offered_break_the_connection() -> None:
    server = new()
    with pytest.raises(ProtocolError, match="beyond the offered"):
        pump(server, flags(4))
    with pytest.raises(ProtocolError):  # and it stays broken
        server.next_event()
    server = new(fixed=False)
    with pytest.raises(ProtocolError):
        pump(server, flags(1))


@BYTEWISE
def test_unknown_option_is_unsupported_and_the_stream_stays_in_sync(bytewise: bool) -> None:
    server = new()
    got = replies(server, flags() + option(99, b"whatever") + option(Opt.LIST), bytewise)
    assert [(o, r) for o, r, _ in got] == [
        (99, Rep.ERR_UNSUP),
        (Opt.LIST, Rep.SERVER),
        (Opt.LIST, Rep.SERVER),
        (Opt.LIST, Rep.ACK),
    ]
    assert got[1][2] == c.U32.pack(4) + b"diskthe disk"
    assert got[2][2] == c.U32.pack(2) + b"roread-only"


@pytest.mark.parametrize(
    "data",
    [
        option(Opt.LIST, b"x"),
        option(Opt.STRUCTURED_REPLY, b"x"),
        option(Opt.STARTTLS, b"x"),
        option(Opt.INFO, c.U32.pack(100) + b"disk" + c.U16.pack(0)),  # name longer than data
        option(Opt.GO, info_data("disk")[:-1]),  # count cut short
        option(Opt.GO, info_data("disk", 1) + b"z"),  # a byte too many
    ],
)
def test_malformed_options_get_one_invalid_reply(data: bytes) -> None:
    server = new()
    got = replies(server, flags() + data + option(Opt.LIST))
    assert got[0][1] == Rep.ERR_INVALID and got[0][2]  # with a message
    assert [r for _, r, _ in got[1:]] == [Rep.SERVER, Rep.SERVER, Rep.ACK]


def test_starttls_without_tls_and_extended_headers_are_refused() -> None:
    server = new()
    got = replies(server, flags() + option(Opt.STARTTLS) + option(Opt.EXTENDED_HEADERS))
    assert [(o, r) for o, r, _ in got] == [
        (Opt.STARTTLS, Rep.ERR_POLICY),
        (Opt.EXTENDED_HEADERS, Rep.ERR_UNSUP),
    ]


def test_listing_can_be_refused_by_policy_and_the_export_still_opens() -> None:
    server = new(listing=False)
    got = replies(server, flags() + option(Opt.LIST))
    assert got == [(Opt.LIST, Rep.ERR_POLICY, b"listing exports is disabled on this server")]
    events, _ = pump(server, option(Opt.GO, info_data("disk")))
    assert isinstance(events[0], ServerReady)


@BYTEWISE
def test_info_then_go_describe_the_export_alike(bytewise: bool) -> None:
    server = new()
    asked = info_data("", c.InfoType.NAME, c.InfoType.DESCRIPTION, c.InfoType.BLOCK_SIZE)
    info = replies(server, flags() + option(Opt.INFO, asked), bytewise)
    events, out = pump(server, option(Opt.GO, asked), bytewise)
    go = [(r.rtype, r.data) for r in option_replies(out)[0]]
    assert [(r, d) for _, r, d in info] == go
    items = {d[:2]: d for r, d in go if r == Rep.INFO}
    without_df = FLAGS & ~TxFlag.SEND_DF
    assert items[c.U16.pack(c.InfoType.EXPORT)] == c.INFO_EXPORT.pack(0, SIZE, without_df)
    assert items[c.U16.pack(c.InfoType.NAME)][2:] == b"disk"  # "" is the default, named
    assert items[c.U16.pack(c.InfoType.DESCRIPTION)][2:] == b"the disk"
    assert items[c.U16.pack(c.InfoType.BLOCK_SIZE)] == c.INFO_BLOCK_SIZE.pack(3, 1, 4096, MAX)
    assert events == [ServerReady(server.transmission.export, False, False)]  # type: ignore[union-attr]


def test_unknown_export_gets_err_unknown_and_the_handshake_goes_on() -> None:
    server = new()
    got = replies(server, flags() + option(Opt.GO, info_data("nope")))
    assert [(o, r) for o, r, _ in got] == [(Opt.GO, Rep.ERR_UNKNOWN)]  # no INFO before it
    events, _ = pump(server, option(Opt.GO, info_data("ro")))
    assert isinstance(events[0], ServerReady) and events[0].export.read_only


@pytest.mark.parametrize("zeroes", [True, False], ids=["no-zeroes", "padded"])
def test_export_name_for_old_clients(zeroes: bool) -> None:
    server = new()
    events, out = pump(server, flags(3 if zeroes else 1) + option(Opt.EXPORT_NAME, b"disk"))
    assert isinstance(events[0], ServerReady)
    assert out == c.EXPORT_NAME_REPLY.pack(SIZE, FLAGS & ~TxFlag.SEND_DF) + (
        b"" if zeroes else bytes(124)
    )
    server = new()
    events, out = pump(server, flags() + option(Opt.EXPORT_NAME, b"nope"))
    assert events == [Closing("EXPORT_NAME of unknown export 'nope'")] and out == b""


def test_a_client_that_is_not_fixed_newstyle_may_only_send_export_name() -> None:
    server = new()
    with pytest.raises(ProtocolError, match="not fixed-newstyle"):
        pump(server, flags(0) + option(Opt.LIST))
    events, _ = pump(new(), flags(0) + option(Opt.EXPORT_NAME, b""))
    assert isinstance(events[0], ServerReady)


def test_abort_acks_and_ignores_what_follows() -> None:
    server = new()
    events, out = pump(server, flags() + option(Opt.ABORT, b"ignored") + b"garbage" * 100)
    assert events == [ClientGone()]
    assert option_replies(out)[0][0].rtype == Rep.ACK
    assert server.state is ServerState.DONE
    server.receive_data(b"more")
    assert server.next_event() is NEED_DATA


@BYTEWISE
def test_abort_with_oversized_data_acks_and_ends_the_session(bytewise: bool) -> None:
    server = new()
    data = option(Opt.ABORT, bytes(c.MAX_OPTION_DATA + 1)) + b"garbage"
    events, out = pump(server, flags() + data, bytewise)
    assert events == [ClientGone()]
    assert [r.rtype for r in option_replies(out)[0]] == [Rep.ACK]
    assert server.state is ServerState.DONE


def test_meta_contexts() -> None:
    server = new()
    before = replies(server, flags() + option(Opt.LIST_META_CONTEXT, meta_data("disk")))
    assert before[0][1] == Rep.ERR_INVALID  # structured replies first
    structured(server, greeted=True)
    allocation = c.U32.pack(0) + c.BASE_ALLOCATION.encode()
    for queries in [(), ("base:",), ("base:allocation", "qemu:dirty-bitmap:x")]:
        got = replies(server, option(Opt.LIST_META_CONTEXT, meta_data("disk", *queries)))
        assert got == [(9, Rep.META_CONTEXT, allocation), (9, Rep.ACK, b"")], queries
    for queries, rtype in [(("qemu:x", "base:other"), Rep.ACK), (("nocolon",), Rep.ERR_INVALID)]:
        got = replies(server, option(Opt.LIST_META_CONTEXT, meta_data("disk", *queries)))
        assert [r for _, r, _ in got] == [rtype]
    got = replies(server, option(Opt.SET_META_CONTEXT, meta_data("nope", "base:allocation")))
    assert [r for _, r, _ in got] == [Rep.ERR_UNKNOWN]
    truncated = meta_data("disk", "base:allocation")[:-3]
    assert replies(server, option(Opt.SET_META_CONTEXT, truncated))[0][1] == Rep.ERR_INVALID


@pytest.mark.parametrize(
    ("queries", "export", "allocation"),
    [
        (("base:allocation", "base:allocation"), "disk", True),
        (("base:",), "disk", False),  # the wildcard selects nothing in SET
        ((), "disk", False),
        (("base:allocation",), "ro", False),  # selected for another export
    ],
)
def test_block_status_needs_the_context_set_for_the_export_opened(
    queries: tuple[str, ...], export: str, allocation: bool
) -> None:
    server = new()
    structured(server)
    got = replies(server, option(Opt.SET_META_CONTEXT, meta_data("", *queries)))
    selected = [d for _, r, d in got if r == Rep.META_CONTEXT]
    assert len(selected) == (1 if "base:allocation" in queries else 0)
    events, _ = pump(server, option(Opt.GO, info_data(export)))
    assert isinstance(events[0], ServerReady) and events[0].allocation is allocation
    assert events[0].export.flags & TxFlag.SEND_DF or export == "ro"
    events, _ = pump(server, request(Cmd.BLOCK_STATUS, 0, 512))
    assert isinstance(events[0], Request if allocation else RequestRefused)


def test_a_second_structured_reply_is_invalid() -> None:
    server = new()
    structured(server)
    assert replies(server, option(Opt.STRUCTURED_REPLY))[0][1] == Rep.ERR_INVALID


@BYTEWISE
def test_oversized_options_are_skipped_without_buffering(bytewise: bool) -> None:
    server = new()
    pump(server, flags())
    huge = 1 << 30
    events, out = pump(server, option(99, length=huge))
    for _ in range(4 if bytewise else 1):  # a few MiB of it, never held
        server.receive_data(bytes(1 << 20))
        assert server.next_event() is NEED_DATA
        assert len(server._buf) == 0  # type: ignore[attr-defined]
    assert out == b"" and events == []
    server = new()
    data = option(Opt.INFO, bytes(c.MAX_OPTION_DATA + 1)) + option(Opt.LIST)
    got = replies(server, flags() + data, bytewise)
    assert [r for _, r, _ in got] == [Rep.ERR_TOO_BIG, Rep.SERVER, Rep.SERVER, Rep.ACK]
    server = new()
    events, out = pump(server, flags() + option(Opt.EXPORT_NAME, bytes(c.MAX_OPTION_DATA + 1)))
    assert isinstance(events[0], Closing) and out == b""


def test_shutting_down_refuses_options_but_abort() -> None:
    server = new()
    pump(server, flags())
    server.shut_down()
    got = replies(server, option(Opt.LIST) + option(Opt.GO, info_data("disk")))
    assert [r for _, r, _ in got] == [Rep.ERR_SHUTDOWN, Rep.ERR_SHUTDOWN]
    events, out = pump(server, option(Opt.ABORT))
    assert events == [ClientGone()] and option_replies(out)[0][0].rtype == Rep.ACK
    server = new()
    server.shut_down()
    assert isinstance(pump(server, flags() + option(Opt.EXPORT_NAME, b"disk"))[0][0], Closing)


def test_closing_mid_handshake_is_a_peer_closed() -> None:
    server = new()
    server.receive_data(flags() + option(Opt.LIST)[:5])
    server.receive_data(b"")
    with pytest.raises(PeerClosed, match="middle of the option header"):
        server.next_event()


# --- transmission -----------------------------------------------------------------------


def opened(*, sr: bool = True, export: str = "disk") -> ServerCore:
    server = new()
    data = flags() + (option(Opt.STRUCTURED_REPLY) if sr else b"")
    data += option(Opt.SET_META_CONTEXT, meta_data(export, "base:allocation")) if sr else b""
    events, _ = pump(server, data + option(Opt.GO, info_data(export)))
    assert isinstance(events[-1], ServerReady)
    return server


@pytest.mark.parametrize(
    ("req", "error"),
    [
        (request(99, 0, 512), errno.EINVAL),
        (request(Cmd.READ, 0, 512, flags=0x40), errno.EINVAL),  # unknown flag
        (request(Cmd.READ, 0, 512, flags=CmdFlag.NO_HOLE), errno.EINVAL),
        (request(Cmd.WRITE_ZEROES, 0, 512, flags=CmdFlag.DF), errno.EINVAL),
        (request(Cmd.BLOCK_STATUS, 0, 512, flags=CmdFlag.FAST_ZERO), errno.EINVAL),
        (request(Cmd.FLUSH, 1, 0), errno.EINVAL),
        (request(Cmd.READ, 0, 0), errno.EINVAL),
        (request(Cmd.READ, SIZE - 1, 2), errno.EINVAL),
        (request(Cmd.TRIM, SIZE, 1), errno.EINVAL),
        (request(Cmd.WRITE_ZEROES, SIZE - 1, 2), errno.ENOSPC),
        (request(Cmd.READ, 0, MAX + 1), errno.EINVAL),
        (request(Cmd.WRITE, SIZE - 1, 2) + b"xx", errno.ENOSPC),
    ],
)
def test_requests_the_core_refuses_by_itself(req: bytes, error: int) -> None:
    server = opened()
    events, _ = pump(server, req + request(Cmd.READ, 0, 1, cookie=2))
    refused = [e for e in events if isinstance(e, RequestRefused)]
    assert len(refused) == 1 and refused[0].error == error and refused[0].message
    assert events[-1] == Request(2, Cmd.READ, 0, 0, 1)  # still in sync


def test_not_offered_and_read_only() -> None:
    server = opened(sr=False, export="ro")
    for cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES):
        payload = b"x" * 512 if cmd == Cmd.WRITE else b""
        events, _ = pump(server, request(cmd, 0, 512) + payload)
        assert events[-1].error == errno.EPERM, cmd  # type: ignore[union-attr]
    for req in (request(Cmd.FLUSH), request(Cmd.READ, 0, 512, flags=CmdFlag.FUA)):
        events, _ = pump(server, req)
        assert events[-1].error == errno.EINVAL  # type: ignore[union-attr]
    events, _ = pump(server, request(Cmd.READ, 0, 512, flags=CmdFlag.DF))
    assert events[-1].error == errno.EINVAL  # type: ignore[union-attr]  # DF needs SR
    events, _ = pump(server, request(Cmd.CACHE, 0, 512))  # accepted though not offered
    assert isinstance(events[-1], Request)


@BYTEWISE
def test_a_write_announces_its_payload_before_it_is_held(bytewise: bool) -> None:
    server = opened()
    events, _ = pump(server, request(Cmd.WRITE, 8, 4096, flags=CmdFlag.FUA))
    assert events == [PayloadComing(1, 4096)]
    events, _ = pump(server, b"p" * 4096 + request(Cmd.FLUSH, cookie=2), bytewise)
    assert events[0] == Request(1, Cmd.WRITE, CmdFlag.FUA, 8, 4096, b"p" * 4096)
    assert events[1] == Request(2, Cmd.FLUSH, 0, 0, 0)
    assert server.in_flight == 2


def test_a_write_whose_payload_came_with_it_is_handed_out_at_once_uncopied() -> None:
    server = opened()
    sent = request(Cmd.WRITE, 8, 4096) + b"p" * 4096 + request(Cmd.WRITE, 0, 512, cookie=2)
    server.receive_data(sent)
    event = server.next_event()
    assert event == Request(1, Cmd.WRITE, 0, 8, 4096, b"p" * 4096)
    assert isinstance(event, Request) and isinstance(event.data, memoryview)
    assert event.data.obj is not None and len(event.data.obj) == len(sent)  # a view of it
    assert server.next_event() == PayloadComing(2, 512)  # its payload has not come
    server.receive_data(b"q" * 512)
    assert server.next_event() == Request(2, Cmd.WRITE, 0, 0, 512, b"q" * 512)
    server.receive_data(request(Cmd.WRITE, SIZE, 512, cookie=3) + b"r" * 512)
    refused = server.next_event()
    assert isinstance(refused, RequestRefused) and refused.error == errno.ENOSPC
    assert server.next_event() is NEED_DATA and server.in_flight == 3


def test_a_write_payload_received_in_place() -> None:
    server = opened()
    pump(server, request(Cmd.WRITE, 0, 1000))
    target = server.payload_target()
    assert target is not None and len(target) == 1000
    target[:600] = b"a" * 600
    server.payload_received(600)
    assert server.next_event() is NEED_DATA
    server.receive_data(b"b" * 400)
    event = server.next_event()
    assert isinstance(event, Request) and bytes(event.data) == b"a" * 600 + b"b" * 400


def test_a_diverted_write_is_handed_out_first_and_its_payload_moved_by_the_caller() -> None:
    server = opened()
    server.receive_data(request(Cmd.WRITE, 512, 1000) + b"a" * 300)
    assert server.next_event() == PayloadComing(1, 1000)
    assert server.incoming_write() == Request(1, Cmd.WRITE, 0, 512, 1000, b"")
    assert server.divert_payload() == Request(1, Cmd.WRITE, 0, 512, 1000, b"")
    assert server.in_flight == 1 and server.payload_left == 1000
    piece = server.buffered_payload()
    assert piece is not None and bytes(piece) == b"a" * 300
    assert server.buffered_payload() is None and server.payload_left == 700
    assert server.payload_target() is None  # nothing goes into a buffer of the core's
    server.payload_received(700)  # read past the core, by the caller
    events, _ = pump(server, request(Cmd.FLUSH, cookie=2))
    assert events == [Request(2, Cmd.FLUSH, 0, 0, 0)] and server.in_flight == 2


def test_a_write_to_be_refused_is_not_diverted() -> None:
    server = opened()
    server.receive_data(request(Cmd.WRITE, SIZE - 512, 1024))  # past the end
    assert server.next_event() == PayloadComing(1, 1024)
    assert server.incoming_write() is None
    events, _ = pump(server, bytes(1024))
    assert [type(e) for e in events] == [RequestRefused]  # refused once, after its payload
    read_only = opened(export="ro")
    read_only.receive_data(request(Cmd.WRITE, 0, 512))
    assert read_only.next_event() == PayloadComing(1, 512)
    assert read_only.incoming_write() is None
    pump(server, request(Cmd.WRITE, 0, 512, cookie=3) + b"x")
    assert server.incoming_write() is None  # some of the payload was taken already


@BYTEWISE
def test_writes_over_the_maximum_are_skipped_and_refused_absurd_ones_break(bytewise: bool) -> None:
    server = opened()
    events, _ = pump(server, request(Cmd.WRITE, 0, MAX + 1) + bytes(MAX + 1), bytewise)
    assert [type(e) for e in events] == [RequestRefused] and events[0].error == errno.EINVAL  # type: ignore[attr-defined]
    assert len(server._buf) == 0  # type: ignore[attr-defined]
    events, _ = pump(server, request(Cmd.READ, 0, 1, cookie=2))
    assert isinstance(events[0], Request)
    with pytest.raises(ProtocolError, match="WRITE payload of"):
        pump(server, request(Cmd.WRITE, 0, c.MAX_REFUSED_PAYLOAD + 1))


def test_disc_ends_reading_and_a_wrong_magic_breaks() -> None:
    server = opened()
    events, _ = pump(server, request(Cmd.READ, 0, 512) + request(Cmd.DISC) + b"junk")
    assert isinstance(events[0], Request) and events[1] == ClientGone()
    assert server.send(Reply(1))  # what was in flight is still answered
    server = opened()
    with pytest.raises(ProtocolError, match="wrong magic"):
        pump(server, b"\x00" * 28)
    server = opened()
    server.receive_data(request(Cmd.WRITE, 0, 100) + b"half")
    server.receive_data(b"")
    with pytest.raises(PeerClosed, match="middle of the write payload"):
        drain(server)
    server = opened()
    server.receive_data(b"")
    with pytest.raises(PeerClosed, match="without NBD_CMD_DISC"):
        server.next_event()


# --- replies, read back by the client core ------------------------------------------------


def client_of(server: ServerCore) -> ClientTransmission:
    t = server.transmission
    assert t is not None
    contexts = {c.BASE_ALLOCATION: 1} if t.allocation else {}
    return ClientTransmission(Negotiated(t.export, t.structured, contexts))


@pytest.mark.parametrize("sr", [True, False])
def test_read_replies_with_data_and_holes(sr: bool) -> None:
    server = opened(sr=sr)
    client = client_of(server)
    cookie, _ = client.request(Cmd.READ, 100, 3000)
    reply = ReadReply(cookie, 100, (b"a" * 900, 1000, memoryview(b"b" * 1100)))
    feed(client, b"".join(server.send(reply)), True)
    events = drain(client)
    buf = bytearray(3000)
    for e in events:
        if isinstance(e, ReadData):
            buf[e.offset - 100 : e.offset - 100 + len(e.data)] = e.data
        elif isinstance(e, ReadHole):
            assert sr
    assert bytes(buf) == b"a" * 900 + bytes(1000) + b"b" * 1100
    assert events[-1] == Done(cookie)


def test_error_replies() -> None:
    server = opened()
    client = client_of(server)
    read, _ = client.request(Cmd.READ, 0, 4096)
    write, _ = client.request(Cmd.WRITE, 0, 512)
    status, _ = client.request(Cmd.BLOCK_STATUS, 0, 8192)
    out = server.send(ReadReply(read, 0, (b"x" * 1024,), errno.EIO, "bad sector", 1024))
    out += server.send(Reply(write, errno.EDQUOT, "not a wire errno"))
    out += server.send(StatusReply(status, ((4096, 3), (8192, 0))))
    feed(client, b"".join(out), False)
    events = drain(client)
    assert Done(read, errno.EIO, "bad sector") in events
    assert Done(write, errno.EIO, "not a wire errno") in events  # mapped onto the eight
    assert Done(status) in events


# --- fuzz: any input is events or a protocol error, within a bound --------------------------

FUZZ_STEPS = 10_000


def run_to_need_data(server: ServerCore) -> None:
    for _ in range(FUZZ_STEPS):
        event = server.next_event()
        if event is NEED_DATA:
            return
        if isinstance(event, (Request, RequestRefused)):
            server.send(Reply(event.cookie))
    raise AssertionError(f"still yielding events after {FUZZ_STEPS} of them")


def pieces() -> st.SearchStrategy[bytes]:
    """Valid messages, mangled ones, and noise, to reach every state."""
    valid = st.sampled_from(
        [
            option(Opt.STRUCTURED_REPLY),
            option(Opt.LIST),
            option(Opt.INFO, info_data("disk", 1, 2, 3)),
            option(Opt.SET_META_CONTEXT, meta_data("disk", "base:allocation")),
            option(Opt.LIST_META_CONTEXT, meta_data("", "base:")),
            option(Opt.GO, info_data("disk")),
            option(Opt.EXPORT_NAME, b"ro"),
            option(Opt.ABORT),
            request(Cmd.READ, 0, 512),
            request(Cmd.WRITE, 512, 16) + b"w" * 16,
            request(Cmd.BLOCK_STATUS, 0, 4096, flags=CmdFlag.REQ_ONE),
            request(Cmd.WRITE, 0, MAX + 10),
            request(Cmd.DISC),
        ]
    )
    lying = st.builds(
        lambda o, n: option(o, length=n), st.integers(0, 12), st.integers(0, 1 << 32 - 1)
    )
    return st.one_of(valid, lying, st.binary(max_size=64))


@settings(max_examples=400, deadline=None)
@given(st.lists(pieces(), max_size=12), st.booleans(), st.integers(1, 40))
def test_fuzz_server_core(parts: list[bytes], prefixed: bool, split: int) -> None:
    server = new()
    data = (flags() if prefixed else b"") + b"".join(parts)
    with contextlib.suppress(ProtocolError):
        for i in range(0, len(data), split):
            server.receive_data(data[i : i + split])
            run_to_need_data(server)
            assert len(server._buf) <= c.MAX_OPTION_DATA + c.OPTION.size + split  # type: ignore[attr-defined]
        server.receive_data(b"")
        run_to_need_data(server)


@pytest.mark.parametrize(
    "pieces", [(b"x" * 10,), (b"x" * 10, 512), (512, b"y" * 3)], ids=["one", "two", "hole"]
)
def test_a_read_reply_is_the_chunks_our_client_parses(pieces: tuple[bytes | int, ...]) -> None:
    """The one-chunk shortcut and the general encoding say the same as the client reads."""
    length = sum(p if isinstance(p, int) else len(p) for p in pieces)
    tx = ClientTransmission(Negotiated(ExportInfo("disk", 1 << 20, c.TxFlag.HAS_FLAGS), True, {}))
    cookie, _ = tx.request(c.Cmd.READ, 4096, length, c.NO_CMD_FLAGS)
    wire = b"".join(bytes(p) for p in encode(ReadReply(cookie, 4096, pieces), structured=True))
    tx.receive_data(wire)
    events = []
    while (event := tx.next_event()) is not NEED_DATA:
        events.append(event)
    got = b"".join(
        bytes(e.data) if isinstance(e, ReadData) else bytes(e.length) for e in events[:-1]
    )
    assert got == b"".join(bytes(p) if isinstance(p, int) else p for p in pieces)
    assert events[-1] == Done(cookie)
