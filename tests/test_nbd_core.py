"""The sans-io NBD core: client/server pairs (whole and byte by byte), hostile input, fuzz."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import blockfuse.nbd
from blockfuse.errors import ProtocolError, ReadOnly, Unimplemented, Unsafe
from blockfuse.nbd import constants as c
from blockfuse.nbd.events import (
    NEED_DATA,
    BlockStatus,
    Closing,
    Done,
    ExportInfo,
    ExportList,
    ExportRefused,
    Negotiated,
    OptionRefused,
    ReadData,
    ReadHole,
    Reply,
)
from blockfuse.nbd.handshake import ClientHandshake
from blockfuse.nbd.options import encode_option
from blockfuse.nbd.replies import simple
from blockfuse.nbd.server import ServerCore
from blockfuse.nbd.transmission import ClientTransmission
from blockfuse.nbd.uri import Address, BadURI, parse_uri

from .nbdpair import FULL_FLAGS, Pair, drain, feed, handshake

BYTEWISE = pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])


NO_IO = ("trio", "socket", "pyfuse3", "asyncio", "selectors")


@pytest.mark.parametrize(
    "module", sorted(p.stem for p in Path(blockfuse.nbd.__file__).parent.glob("*.py"))
)
def test_core_imports_no_io(module: str) -> None:
    """Importing any module of the sans-io core, in a fresh interpreter, loads no I/O."""
    probe = (
        f"import sys, blockfuse.nbd.{module}\n"
        f"print(' '.join(sorted(m for m in {NO_IO!r} if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "", f"blockfuse.nbd.{module} loads {out.stdout.strip()}"


# --- handshakes -----------------------------------------------------------------------


@BYTEWISE
@pytest.mark.parametrize("structured", [True, False])
def test_go_negotiates(bytewise: bool, structured: bool) -> None:
    p = Pair(bytewise=bytewise, structured=structured)
    assert p.negotiated.structured is structured
    assert p.negotiated.export.size == 1 << 20
    assert p.negotiated.export.description == "a test disk"
    assert p.negotiated.contexts == ({c.BASE_ALLOCATION: 1} if structured else {})


@BYTEWISE
def test_go_unsupported_falls_back_to_export_name(bytewise: bool) -> None:
    p = Pair(bytewise=bytewise, go=False)
    assert p.negotiated.export.size == 1 << 20
    assert p.read(0, 4096)[0] == bytes(4096)


@BYTEWISE
def test_non_fixed_newstyle_uses_export_name_with_padding(bytewise: bool) -> None:
    p = Pair(bytewise=bytewise, fixed=False)
    assert not p.negotiated.structured
    assert p.negotiated.export.flags == FULL_FLAGS & ~c.TxFlag.SEND_DF  # DF needs SR


def exports() -> list[ExportInfo]:
    return [
        ExportInfo("a", 1024, c.TxFlag.HAS_FLAGS, "first"),
        ExportInfo("b", 4096, c.TxFlag.HAS_FLAGS | c.TxFlag.READ_ONLY),
    ]


@BYTEWISE
def test_list_with_details(bytewise: bool) -> None:
    outcome = handshake(ClientHandshake.list(), ServerCore(exports()), bytewise)
    assert isinstance(outcome, ExportList)
    assert [(e.name, e.size, e.description, e.read_only) for e in outcome.exports] == [
        ("a", 1024, "first", False),
        ("b", 4096, "", True),
    ]


@BYTEWISE
def test_list_refused_by_policy(bytewise: bool) -> None:
    outcome = handshake(ClientHandshake.list(), ServerCore(exports(), listing=False), bytewise)
    assert isinstance(outcome, OptionRefused)
    assert outcome.reply == c.Rep.ERR_POLICY and outcome.reply_name == "ERR_POLICY"
    assert outcome.message == "listing exports is disabled on this server"


def test_unknown_export_is_refused_and_aborted() -> None:
    server = ServerCore(exports())
    hs = ClientHandshake.go("nope")
    outcome = handshake(hs, server, False)
    assert isinstance(outcome, OptionRefused)
    assert outcome.option is c.Opt.GO and outcome.reply == c.Rep.ERR_UNKNOWN
    assert "nope" in outcome.message
    assert server.state.name == "DONE"  # the client sent NBD_OPT_ABORT


def test_a_server_shutting_down_during_the_handshake_gets_abort() -> None:
    hs = ClientHandshake.go("x")
    flags = c.HandshakeFlag.FIXED_NEWSTYLE | c.HandshakeFlag.NO_ZEROES
    hs.receive_data(c.GREETING.pack(c.NBDMAGIC, c.IHAVEOPT, flags))
    assert hs.next_event() is NEED_DATA
    hs.data_to_send()  # client flags, then STRUCTURED_REPLY
    rtype = c.Rep.ERR_SHUTDOWN
    hs.receive_data(c.OPTION_REPLY.pack(c.OPTION_REPLY_MAGIC, c.Opt.STRUCTURED_REPLY, rtype, 0))
    outcome = hs.next_event()
    assert isinstance(outcome, OptionRefused) and outcome.reply == c.Rep.ERR_SHUTDOWN
    assert hs.data_to_send() == encode_option(c.Opt.ABORT)  # a soft disconnect, no GO


def test_unknown_export_with_export_name_names_it() -> None:
    server = ServerCore(exports(), go=False)
    hs = ClientHandshake.go("nope")
    with pytest.raises(ProtocolError, match="EXPORT_NAME"):
        for _ in range(20):
            feed(hs, server.data_to_send(), False)
            hs.next_event()
            feed(server, hs.data_to_send(), False)
            if any(isinstance(e, Closing) for e in drain(server)):
                hs.receive_data(b"")  # the server closes the connection


def greeting(flags: int = 3) -> bytes:
    return c.GREETING.pack(c.NBDMAGIC, c.IHAVEOPT, flags)


def option_reply(option: int, rtype: int, data: bytes = b"") -> bytes:
    return c.OPTION_REPLY.pack(c.OPTION_REPLY_MAGIC, option, rtype, len(data)) + data


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"NOTMAGIC" + bytes(10), "not an NBD server"),
        (c.U64.pack(c.NBDMAGIC) + c.U64.pack(c.CLISERV_MAGIC) + bytes(2), "oldstyle"),
        (greeting() + option_reply(7, 1), "while"),
        (greeting() + c.OPTION_REPLY.pack(c.OPTION_REPLY_MAGIC, 8, 1, 1 << 30), "limit"),
        (greeting() + option_reply(8, 77), "unexpected reply type 77"),
        (greeting() + c.OPTION_REPLY.pack(5, 8, 1, 0), "wrong magic"),
    ],
)
def test_hostile_handshakes(data: bytes, match: str) -> None:
    hs = ClientHandshake.go("x")
    hs.receive_data(data)
    with pytest.raises(ProtocolError, match=match):
        while hs.next_event() is not NEED_DATA:
            pass
    with pytest.raises(ProtocolError):
        hs.next_event()


def test_eof_during_handshake() -> None:
    hs = ClientHandshake.go("x")
    with pytest.raises(ProtocolError, match="closed"):
        hs.receive_data(b"")


# --- transmission -------------------------------------------------------------------


@BYTEWISE
@pytest.mark.parametrize("structured", [True, False])
def test_write_then_read_with_holes(bytewise: bool, structured: bool) -> None:
    p = Pair(bytewise=bytewise, structured=structured)
    data = os.urandom(8192) + bytes(8192) + os.urandom(100) + bytes(3996)
    p.send(c.Cmd.WRITE, 4096, len(data), data)
    p.serve()
    assert p.receive() == [Done(1)]
    got, done = p.read(0, 8 * 4096)
    assert done.error == 0
    assert got == bytes(4096) + data + bytes(8 * 4096 - 4096 - len(data))


@BYTEWISE
def test_many_in_flight_answered_out_of_order(bytewise: bool) -> None:
    p = Pair(bytewise=bytewise)
    p.disk[:] = os.urandom(len(p.disk))
    cookies = [p.send(c.Cmd.READ, i * 4096, 4096) for i in range(32)]
    cookies.append(p.send(c.Cmd.FLUSH))
    p.serve()
    events = p.receive()
    done = [e.cookie for e in events if isinstance(e, Done)]
    assert sorted(done) == sorted(cookies) and done != cookies
    for e in events:
        if isinstance(e, ReadData):
            assert bytes(e.data) == p.disk[e.offset : e.offset + len(e.data)]


def test_block_status_and_trim_zero() -> None:
    p = Pair()
    p.disk[4096:8192] = b"x" * 4096
    cookie = p.send(c.Cmd.BLOCK_STATUS, 0, 8192)
    p.send(c.Cmd.TRIM, 0, 512)
    p.send(c.Cmd.WRITE_ZEROES, 512, 512)
    p.serve()
    events = p.receive()
    assert BlockStatus(cookie, 1, ((4096, 3), (4096, 0))) in events
    assert [type(e) for e in events].count(Done) == 3


def test_error_replies_keep_the_connection() -> None:
    p = Pair()
    cookie = p.send(c.Cmd.READ, 0, 512)
    drain(p.server)
    p.push(b"".join(p.server.send(Reply(cookie, errno.EIO, "disk on fire"))))
    assert p.receive() == [Done(cookie, errno.EIO, "disk on fire")]
    cookie = p.send(c.Cmd.WRITE, 0, 512, bytes(512))
    drain(p.server)
    p.push(simple(cookie, 42))  # not an NBD error value: read as EINVAL
    assert p.receive() == [Done(cookie, errno.EINVAL)]
    assert p.read(0, 512)[1].error == 0


def test_requests_are_checked_locally() -> None:
    p = Pair(flags=c.TxFlag.HAS_FLAGS | c.TxFlag.READ_ONLY)
    with pytest.raises(ReadOnly):
        p.client.request(c.Cmd.WRITE, 0, 512)
    with pytest.raises(Unimplemented):
        p.client.request(c.Cmd.FLUSH)
    with pytest.raises(Unimplemented):
        p.client.request(c.Cmd.READ, 0, 512, c.CmdFlag.FUA)
    with pytest.raises(Unsafe):
        p.client.request(c.Cmd.READ, (1 << 20) - 512, 1024)
    with pytest.raises(Unsafe):
        p.client.request(c.Cmd.READ, 0, 0)
    with pytest.raises(Unsafe):
        p.client.request(c.Cmd.READ, 0, (1 << 25) + 512)
    assert p.client.in_flight == 0


def negotiated(structured: bool = True) -> Negotiated:
    export = ExportInfo("d", 1 << 20, FULL_FLAGS)
    return Negotiated(export, structured, {c.BASE_ALLOCATION: 1})


def chunk(cookie: int, ctype: int, payload: bytes, flags: int = 1) -> bytes:
    magic = c.STRUCTURED_REPLY_MAGIC
    return c.CHUNK_HEADER.pack(magic, flags, ctype, cookie, len(payload)) + payload


def data_chunk(cookie: int, offset: int, data: bytes, flags: int = 1) -> bytes:
    return chunk(cookie, c.Chunk.OFFSET_DATA, c.U64.pack(offset) + data, flags)


def error_chunk(
    ctype: int, error: int, message: bytes, tail: bytes = b"", length: int | None = None
) -> bytes:
    """An error chunk for cookie 1; ``length`` overrides the message length it claims."""
    header = c.ERROR_HEADER.pack(error, len(message) if length is None else length)
    return chunk(1, ctype, header + message + tail)


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (c.SIMPLE_REPLY.pack(0x12345678, 0, 1), "unknown magic"),
        (c.SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, 0, 99), "unknown cookie"),
        (c.CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, 1, 1, 1, 1 << 31), "invalid chunk"),
        (data_chunk(1, 4096, bytes(512)), "outside the request"),
        (data_chunk(1, 0, bytes(512), 0) + data_chunk(1, 0, bytes(512)), "overlaps"),
        (data_chunk(1, 0, bytes(512)), "ended after 512 of 1024"),
        (chunk(1, 77, b""), "unknown non-error chunk type"),
        (chunk(1, c.Chunk.BLOCK_STATUS, bytes(12)), "invalid chunk"),
        (chunk(1, c.Chunk.NONE, b"", 0), "invalid chunk"),
        (error_chunk(c.Chunk.ERROR_OFFSET, 5, b"", c.U64.pack(1 << 20)), "outside the READ"),
        (error_chunk(0x8055, 5, b"hi", length=4000), "message of 4000 bytes in 8 bytes"),
        (
            data_chunk(1, 0, bytes(512), 0) + c.SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, 0, 1),
            "simple reply for cookie 0x1 after structured chunks",
        ),
    ],
)
def test_hostile_replies_break_the_connection(reply: bytes, match: str) -> None:
    tx = ClientTransmission(negotiated())
    tx.request(c.Cmd.READ, 0, 1024)
    tx.receive_data(reply)
    with pytest.raises(ProtocolError, match=match):
        while tx.next_event() is not NEED_DATA:
            pass
    with pytest.raises(ProtocolError):
        tx.next_event()
    with pytest.raises(Unsafe):
        tx.request(c.Cmd.READ, 0, 512)


def test_unknown_error_chunk_fails_only_that_request() -> None:
    tx = ClientTransmission(negotiated())
    cookie, _ = tx.request(c.Cmd.READ, 0, 512)
    payload = c.ERROR_HEADER.pack(errno.EIO, 2) + b"hi"
    tx.receive_data(chunk(cookie, 0x8055, payload))
    assert tx.next_event() == Done(cookie, errno.EIO, "hi")


def test_hole_and_data_reassemble_in_any_order() -> None:
    tx = ClientTransmission(negotiated())
    cookie, _ = tx.request(c.Cmd.READ, 4096, 3 * 512)
    tx.receive_data(data_chunk(cookie, 4096 + 1024, b"z" * 512, 0))
    tx.receive_data(chunk(cookie, c.Chunk.OFFSET_HOLE, c.HOLE.pack(4096, 1024)))
    events = drain(tx)
    assert isinstance(events[0], ReadData) and bytes(events[0].data) == b"z" * 512
    assert events[1:] == [ReadHole(cookie, 4096, 1024), Done(cookie)]


def test_eof_with_requests_in_flight() -> None:
    tx = ClientTransmission(negotiated())
    tx.request(c.Cmd.FLUSH)
    tx.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed the connection with 1 request"):
        tx.next_event()


def test_memory_stays_bounded_by_what_was_asked() -> None:
    tx = ClientTransmission(negotiated())
    tx.request(c.Cmd.READ, 0, 512)
    # a chunk header claiming 16 MiB for a 512-byte read is refused before any payload
    tx.receive_data(c.CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, 1, 1, 1, 1 << 24))
    with pytest.raises(ProtocolError, match="invalid chunk type 1 of 16777216 bytes"):
        tx.next_event()


# --- fuzz -----------------------------------------------------------------------------


HANDSHAKE_OUTCOMES = (Negotiated, ExportList, OptionRefused, ExportRefused)
FUZZ_STEPS = 10_000
"""More events than any fuzz input can yield: a core still going after them is looping."""


def run_to_end(core: object, data: bytes) -> None:
    """Feed ``data``; the core must stop (NEED_DATA or an outcome) within ``FUZZ_STEPS``."""
    core.receive_data(data)  # type: ignore[attr-defined]
    for _ in range(FUZZ_STEPS):
        event = core.next_event()  # type: ignore[attr-defined]
        if event is NEED_DATA or isinstance(event, HANDSHAKE_OUTCOMES):
            return
        assert isinstance(event, (ReadData, ReadHole, BlockStatus, Done)), event
    raise AssertionError(f"still yielding events after {FUZZ_STEPS} of them")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_fuzz_handshake(data: bytes, prefixed: bool) -> None:
    hs = ClientHandshake.go("x") if prefixed else ClientHandshake.list()
    with contextlib.suppress(ProtocolError):
        run_to_end(hs, (greeting() if prefixed else b"") + data)


HEADERS = st.sampled_from(
    [
        c.SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, 0, 1),
        c.SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, 5, 2),
        c.CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, 1, 1, 1, 24),
        c.CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, 0, 2, 1, 12),
        c.CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, 1, 5, 3, 12),
        c.CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, 1, 0x8001, 2, 8),
        b"",
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(HEADERS, st.binary(max_size=40)), max_size=6), st.booleans())
def test_fuzz_transmission(parts: list[tuple[bytes, bytes]], structured: bool) -> None:
    tx = ClientTransmission(negotiated(structured))
    tx.request(c.Cmd.READ, 0, 16)
    tx.request(c.Cmd.FLUSH)
    tx.request(c.Cmd.BLOCK_STATUS, 0, 4096)
    with contextlib.suppress(ProtocolError):
        run_to_end(tx, b"".join(h + d for h, d in parts))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_server_core(data: bytes) -> None:
    server = ServerCore(exports())
    server.receive_data(c.CLIENT_FLAGS.pack(3) + data)
    with contextlib.suppress(ProtocolError):
        for _ in range(FUZZ_STEPS):
            if server.next_event() is NEED_DATA:
                break
        else:
            raise AssertionError(f"still yielding events after {FUZZ_STEPS} of them")


# --- URIs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "address"),
    [
        ("nbd://example.com/disk", Address("disk", host="example.com")),
        ("nbd://127.0.0.1:1234/", Address("", host="127.0.0.1", port=1234)),
        ("nbd+unix:///a%20b?socket=/run/s", Address("a b", socket="/run/s")),
        ("nbd+unix:///?socket=/s", Address("", socket="/s")),
    ],
)
def test_uris(uri: str, address: Address) -> None:
    assert parse_uri(uri) == address
    assert parse_uri(str(address)) == address


@pytest.mark.parametrize(
    "uri", ["nbd+unix:///x", "nbd://h:99999/x", "nbd+vsock:///x", "nbd:///x", "http://h/x"]
)
def test_bad_uris(uri: str) -> None:
    with pytest.raises(BadURI):
        parse_uri(uri)


def test_block_status_for_one_context_only_once() -> None:
    tx = ClientTransmission(negotiated())
    cookie, _ = tx.request(c.Cmd.BLOCK_STATUS, 0, 4096)
    status = c.U32.pack(1) + c.EXTENT.pack(4096, 0)
    tx.receive_data(chunk(cookie, c.Chunk.BLOCK_STATUS, status, 0) * 2)
    assert isinstance(tx.next_event(), BlockStatus)
    with pytest.raises(ProtocolError, match="not asked"):
        tx.next_event()


def test_block_status_extents_before_the_last_must_end_inside_the_request() -> None:
    tx = ClientTransmission(negotiated())
    cookie, _ = tx.request(c.Cmd.BLOCK_STATUS, 0, 4096)
    status = c.U32.pack(1) + c.EXTENT.pack(4096, 0) + c.EXTENT.pack(4096, 3)
    tx.receive_data(chunk(cookie, c.Chunk.BLOCK_STATUS, status))
    with pytest.raises(ProtocolError, match="first 1 cover 4096 bytes of a 4096-byte"):
        tx.next_event()


def test_the_last_block_status_extent_may_run_past_the_request() -> None:
    tx = ClientTransmission(negotiated())
    cookie, _ = tx.request(c.Cmd.BLOCK_STATUS, 0, 4096)
    status = c.U32.pack(1) + c.EXTENT.pack(512, 0) + c.EXTENT.pack(1 << 16, 3)
    tx.receive_data(chunk(cookie, c.Chunk.BLOCK_STATUS, status))
    assert drain(tx) == [BlockStatus(cookie, 1, ((512, 0), (1 << 16, 3))), Done(cookie)]


def test_a_successful_block_status_needs_its_status_chunk() -> None:
    tx = ClientTransmission(negotiated())
    cookie, _ = tx.request(c.Cmd.BLOCK_STATUS, 0, 4096)
    tx.receive_data(chunk(cookie, c.Chunk.NONE, b""))
    with pytest.raises(ProtocolError, match="without a status chunk for context"):
        tx.next_event()
    tx = ClientTransmission(negotiated())
    cookie, _ = tx.request(c.Cmd.BLOCK_STATUS, 0, 4096)
    tx.receive_data(chunk(cookie, c.Chunk.ERROR, c.ERROR_HEADER.pack(errno.EIO, 0)))
    assert tx.next_event() == Done(cookie, errno.EIO, "")  # a failed one needs none


def test_an_error_offset_inside_the_request_fails_only_that_request() -> None:
    tx = ClientTransmission(negotiated())
    cookie, _ = tx.request(c.Cmd.READ, 0, 1024)
    tx.receive_data(error_chunk(c.Chunk.ERROR_OFFSET, errno.EIO, b"bad", c.U64.pack(512)))
    assert tx.next_event() == Done(cookie, errno.EIO, "bad")


def test_block_status_for_an_unselected_context() -> None:
    tx = ClientTransmission(negotiated())
    cookie, _ = tx.request(c.Cmd.BLOCK_STATUS, 0, 4096)
    tx.receive_data(chunk(cookie, c.Chunk.BLOCK_STATUS, c.U32.pack(9) + c.EXTENT.pack(4096, 0)))
    with pytest.raises(ProtocolError, match="context 9"):
        tx.next_event()


# --- specs and the command line --------------------------------------------------------


def test_specs_take_nbd_uris(short_tmp: Path) -> None:
    import socket

    from blockfuse.spec import SpecError, compile_spec

    path = short_tmp / "s"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    try:
        assert compile_spec(f"nbd+unix:///disk?socket={path}").kind == "nbd"
        assert compile_spec(f"safe(nbd+unix:///?socket={path})").kind == "nbd"
        assert compile_spec("nbd(nbd://127.0.0.1:10809/x)").kind == "nbd"
        assert compile_spec("nbd://example.com/disk").text == "nbd://example.com/disk"
    finally:
        listener.close()
    for bad, match in [
        (f"nbd+unix:///?socket={short_tmp}/none", "no NBD server socket"),
        ("nbd://h:99999/x", "bad port"),
        ("nbd://h:0/x", "bad port 0"),
        ("nbd://[::1/x", "not an NBD URI: Invalid IPv6 URL"),
        ("nbd+vsock:///x", "not supported"),
    ]:
        with pytest.raises(SpecError, match=match):
            compile_spec(bad)


def test_nbd_specs_take_a_timeout() -> None:
    from blockfuse.spec import SpecError, compile_spec

    assert compile_spec("nbd(nbd://h/x, timeout=2.5)").text == "nbd(nbd://h/x, timeout=2.5)"
    assert compile_spec("nbd(nbd://h/x, timeout=30)").text == "nbd://h/x"  # the default
    for bad in ("0", "-1", "soon", "nan", "inf", "1e9"):
        with pytest.raises(SpecError, match=f"bad timeout '{bad}'"):
            compile_spec(f"nbd(nbd://h/x, timeout={bad})")


def test_ls_rejects_a_bad_uri(capsys: pytest.CaptureFixture[str]) -> None:
    from blockfuse.cli import main

    assert main(["ls", "http://example.com/"]) == 2
    assert "'http://example.com/': unsupported URI scheme 'http'" in capsys.readouterr().err
