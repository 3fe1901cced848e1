"""The NBD client against a hostile server: every limit is ours, every wait has a deadline.

The peer is ``tests/hostile_nbd.py``, in-process over memory streams.  Tests that wait
on the client's own deadlines run on trio's autojump clock, so a 30-second timeout
passes in no real time and is measured exactly.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path

import pytest
import trio
import trio.testing

from blockfuse.devices.remote import RemoteDevice
from blockfuse.errors import BlockError, ProtocolError, RequestFailed, Unreachable
from blockfuse.nbd import constants as c
from blockfuse.nbd.coverage import Coverage
from blockfuse.nbd.events import NEED_DATA, ExportInfo, ExportList, Negotiated, OptionRefused
from blockfuse.nbd.handshake import ClientHandshake
from blockfuse.nbd.transmission import ClientTransmission
from blockfuse.nbd.uri import Address
from blockfuse.transport.client import NBDClient
from blockfuse.transport.connect import LIST_TIMEOUT, list_exports, wrap_nbd_stream
from blockfuse.transport.handshake import Stalled, refusal_message
from blockfuse.transport.reconnect import Reconnecting

from .hostile_nbd import (
    Hostile,
    HostileProcess,
    Script,
    Stall,
    one_byte_chunks,
    reply,
    serve_unix,
)
from .nbdpair import FULL_FLAGS


async def connect(
    nursery: trio.Nursery, hostile: Hostile, *, lockstep: bool = False, **kw: object
) -> NBDClient:
    """A client of ``hostile``; ``lockstep`` streams hold no buffer, so a server that
    stops reading blocks the client's sends at once."""
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    client_end, server_end = pair()
    nursery.start_soon(hostile.handle, server_end)
    with trio.fail_after(60):
        return await wrap_nbd_stream(nursery, client_end, "disk", server="hostile", **kw)  # type: ignore[arg-type]


def greeting() -> bytes:
    return c.GREETING.pack(c.NBDMAGIC, c.IHAVEOPT, 3)


def go_until_meta_context(hs: ClientHandshake) -> None:
    """Bring ``hs`` (``go``) to the point where SET_META_CONTEXT was sent."""
    hs.receive_data(greeting() + reply(c.Opt.STRUCTURED_REPLY, c.Rep.ACK))
    assert hs.next_event() is NEED_DATA


# --- defect 9: bounded memory and CPU ---------------------------------------------------


async def test_a_meta_context_flood_is_refused(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """400,000 META_CONTEXT replies once took a mount to 1.6 GiB; one reply per context
    asked for is all the spec allows, so the second one ends the handshake."""
    hostile = Hostile(Script(meta_contexts=2000, meta_name_len=4000))
    with pytest.raises(ProtocolError, match="META_CONTEXT reply for 'x-hostile:1"):
        await connect(nursery, hostile)


def test_a_meta_context_flood_is_refused_at_the_first_extra_reply() -> None:
    hs = ClientHandshake.go("disk")
    go_until_meta_context(hs)
    meta = c.Opt.SET_META_CONTEXT
    hs.receive_data(reply(meta, c.Rep.META_CONTEXT, c.U32.pack(1) + c.BASE_ALLOCATION.encode()))
    assert hs.next_event() is NEED_DATA
    hs.receive_data(reply(meta, c.Rep.META_CONTEXT, c.U32.pack(2) + c.BASE_ALLOCATION.encode()))
    with pytest.raises(ProtocolError, match="again"):
        hs.next_event()


def negotiate_block_size(sizes: tuple[int, int, int]) -> object:
    hs = ClientHandshake.go("disk", structured=False)
    info = c.INFO_EXPORT.pack(c.InfoType.EXPORT, 1 << 20, FULL_FLAGS)
    hs.receive_data(
        greeting()
        + reply(c.Opt.GO, c.Rep.INFO, info)
        + reply(c.Opt.GO, c.Rep.INFO, c.INFO_BLOCK_SIZE.pack(c.InfoType.BLOCK_SIZE, *sizes))
        + reply(c.Opt.GO, c.Rep.ACK)
    )
    return hs.next_event()


@pytest.mark.parametrize(
    "sizes", [(1, 1, 1), (1, 256, 1 << 20), (4096, 1024, 1 << 20), (512, 4096, 2048)]
)
def test_block_sizes_the_spec_forbids_are_refused(sizes: tuple[int, int, int]) -> None:
    """1/1/1 turned a 512 KiB read into 524,288 requests; preferred must be a power of two
    of at least max(minimum, 512), and the maximum at least the preferred size."""
    with pytest.raises(ProtocolError, match="block sizes"):
        negotiate_block_size(sizes)


@pytest.mark.parametrize("sizes", [(1, 512, 512), (1, 4096, 1 << 25), (512, 4096, 0xFFFFFFFF)])
def test_block_sizes_the_spec_allows_are_taken(sizes: tuple[int, int, int]) -> None:
    outcome = negotiate_block_size(sizes)
    assert isinstance(outcome, Negotiated)
    assert (outcome.export.min_block, outcome.export.max_payload) == (sizes[0], sizes[2])


def test_a_read_scattered_into_one_byte_chunks_is_refused_in_linear_time() -> None:
    """Out-of-order 1-byte chunks made the received-bytes tracking quadratic (21 CPU-s
    for 512 KiB): the pieces a reply may leave apart are bounded, each step is cheap."""
    export = ExportInfo("disk", 1 << 20, FULL_FLAGS)
    tx = ClientTransmission(Negotiated(export, True, {c.BASE_ALLOCATION: 1}))
    cookie, _ = tx.request(c.Cmd.READ, 0, 512 << 10)
    tx.receive_data(one_byte_chunks(cookie, 0, bytes(512 << 10)))
    started = time.process_time()
    with pytest.raises(ProtocolError, match="pieces"):
        while tx.next_event() is not NEED_DATA:
            pass
    assert time.process_time() - started < 2  # about 0.01 s; the quadratic tracking: 21 s


def test_coverage_keeps_in_order_and_reverse_chunks_as_one_piece() -> None:
    forward, backward = Coverage(), Coverage()
    for i in range(100_000):
        forward.add(i, i + 1)
        backward.add(99_999 - i, 100_000 - i)
    assert forward.total == backward.total == 100_000
    with pytest.raises(ProtocolError, match="overlaps"):
        forward.add(5, 6)


async def test_one_byte_chunks_through_the_client_fail_only_that_connection(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    hostile = Hostile(Script(one_byte_chunks=True))
    client = await connect(nursery, hostile)
    started = time.process_time()
    with trio.fail_after(60), pytest.raises(ProtocolError, match="pieces"):
        await client.pread(memoryview(bytearray(512 << 10)), 0)
    assert time.process_time() - started < 2
    await client.aclose()


def test_the_list_cap_counts_info_replies(monkeypatch: pytest.MonkeyPatch) -> None:
    """LIST's byte cap once ignored the INFO replies after it (``ls`` peaked at 569 MiB):
    names and descriptions from INFO count against the same cap."""
    monkeypatch.setattr("blockfuse.nbd.handshake.MAX_LIST_BYTES", 64 << 10)
    names = [f"e{i}" for i in range(32)]
    data = greeting() + b"".join(
        reply(c.Opt.LIST, c.Rep.SERVER, c.U32.pack(len(n)) + n.encode()) for n in names
    )
    data += reply(c.Opt.LIST, c.Rep.ACK)
    description = c.U16.pack(c.InfoType.DESCRIPTION) + b"d" * c.MAX_STRING
    export = c.INFO_EXPORT.pack(c.InfoType.EXPORT, 1 << 20, FULL_FLAGS)
    for _ in names:
        data += reply(c.Opt.INFO, c.Rep.INFO, export) + reply(c.Opt.INFO, c.Rep.INFO, description)
        data += reply(c.Opt.INFO, c.Rep.ACK)
    hs = ClientHandshake.list()
    with pytest.raises(ProtocolError, match="LIST"):
        for i in range(0, len(data), 1 << 16):  # as it arrives; the core answers each INFO
            hs.receive_data(data[i : i + (1 << 16)])
            outcome = hs.next_event()
            assert not isinstance(outcome, ExportList), "the whole list was taken"


async def test_an_info_flood_is_refused(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A server may add INFO items nobody asked for, but not without end."""
    with pytest.raises(ProtocolError, match="INFO replies"):
        await connect(nursery, Hostile(Script(info_flood=1000)))


# --- defect 10: exports too big for a file ---------------------------------------------


@pytest.mark.parametrize("size", [1 << 63, (1 << 64) - 1])
@pytest.mark.parametrize("export_name", [False, True], ids=["go", "export_name"])
async def test_an_export_of_2_63_bytes_or_more_is_refused_at_the_handshake(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, size: int, export_name: bool
) -> None:
    """Such an export once mounted, then every stat failed with OverflowError (and a
    healthy second device vanished from the listing); file sizes are signed 64-bit."""
    hostile = Hostile(Script(size=size))
    with pytest.raises(BlockError, match=f"is {size} bytes; blockfuse can use exports of up to"):
        await connect(nursery, hostile, export_name=export_name)
    with trio.fail_after(60):
        await hostile.disconnected.wait()  # a soft disconnect: NBD_CMD_DISC, not a drop


async def test_the_largest_usable_export_is_taken(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    client = await connect(nursery, Hostile(Script(size=(1 << 63) - 512)))
    assert client.export.size == (1 << 63) - 512
    await client.aclose()


# --- defect 11: what a user sees ----------------------------------------------------------


def blockfuse_ls(uri: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockfuse.cli", "ls", uri],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ls_when_the_size_lookup_is_refused_prints_one_line(short_tmp: Path) -> None:
    """An export of size 0 gets a second connection to learn its size; a server that
    takes one session only (nbd-server -d) refuses it, which ended in a 57-line
    ExceptionGroup traceback."""
    server = HostileProcess(short_tmp, {"size": 0}, max_connections=1)
    try:
        out = blockfuse_ls(server.uri())
    finally:
        server.stop()
    assert (out.returncode, out.stdout, out.stderr) == (0, "disk\t?\t\n", "")


def test_ls_escapes_control_characters_in_names_and_descriptions(short_tmp: Path) -> None:
    name, desc = "a\nb\tc\x1b[31m\x00d", "line\r\nbell\x07"
    server = HostileProcess(short_tmp, {"exports": [[name, desc]]})
    try:
        out = blockfuse_ls(server.uri())
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr
    assert out.stdout == "a\\nb\\tc\\x1b[31m\\x00d\t1 MiB\tline\\r\\nbell\\x07\n"


async def test_bytes_after_the_last_handshake_reply_are_parsed(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """Garbage sent together with GO's ACK was dropped (``trailing_data`` was never used);
    it is the start of transmission, so it breaks the protocol and the connection."""
    hostile = Hostile(Script(trailing=b"\xde\xad\xbe\xef" * 8))
    client = await connect(nursery, hostile)
    with trio.fail_after(60), pytest.raises(ProtocolError, match="unknown magic 0xdeadbeef"):
        await client.pread(memoryview(bytearray(512)), 0)
    await client.aclose()


def test_server_text_in_a_refusal_is_escaped() -> None:
    refusal = OptionRefused(c.Opt.GO, c.Rep.ERR_UNKNOWN, "no\x1b[2J such\nexport")
    message = refusal_message(refusal, "unix:/s", "disk")
    assert message == "unix:/s has no export named 'disk' (no\\x1b[2J such\\nexport)"


async def remote_on(
    nursery: trio.Nursery, hostile: Hostile, *, lockstep: bool = False, **kw: float
) -> RemoteDevice:
    async def reconnect(n: trio.Nursery) -> NBDClient:
        return await connect(n, hostile, lockstep=lockstep)

    link = Reconnecting(nursery, reconnect, await reconnect(nursery), **kw)  # type: ignore[arg-type]
    return RemoteDevice(link, Address("disk", socket="/hostile"))


async def test_the_connection_status_keeps_the_last_failure_and_the_reconnects(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    """It said a generic 'closed the connection' and went back to plain 'connected'."""
    hostile = Hostile(Script(close_every=2))
    dev = await remote_on(nursery, hostile)
    with trio.fail_after(60):
        for _ in range(3):  # the 1st is answered, the 2nd and 3rd dropped once each
            await dev.read(8, [bytearray(4096)])
    state = dev.status()["connection"]
    assert state == (
        "connected; reconnected 2 times, last: read of 4096 bytes at 4096: hostile: the "
        "server closed the connection with 1 request(s) in flight (while reading a reply header)"
    )
    assert len(state) <= 300
    await dev.aclose()


# --- defect 7: every request has a deadline --------------------------------------------

DEFAULT_TIMEOUT = 30


async def failure_of(aw: Awaitable[object]) -> Exception:
    try:
        await aw
    except Exception as exc:
        return exc
    raise AssertionError("it succeeded")


@pytest.mark.parametrize("stall", list(Stall))
async def test_a_stalled_server_fails_the_request_at_its_deadline_then_reconnects(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, stall: Stall
) -> None:
    """A server that stops answering before, during or after a reply left the reader
    blocked forever (unkillable behind a mount); the request now fails with ETIMEDOUT
    at its deadline, the connection is dropped, and the next request gets a new one."""
    first = 1 if stall is Stall.AFTER else 2  # the write is answered, the read is not
    hostile = Hostile(Script(stall=stall, stall_from=first, stall_on=[1]))
    dev = await remote_on(nursery, hostile)
    await dev.write(0, [b"x" * 4096])
    started = trio.current_time()
    with trio.fail_after(10 * DEFAULT_TIMEOUT):
        error = await failure_of(dev.read(0, [bytearray(4096)]))
    assert isinstance(error, RequestFailed) and error.errno == errno.ETIMEDOUT, error
    assert trio.current_time() - started == pytest.approx(DEFAULT_TIMEOUT, abs=1)
    assert str(error) == "read of 4096 bytes at 0 got no answer from hostile within 30 s"
    await trio.testing.wait_all_tasks_blocked()  # the reader saw the same deadline pass
    state = dev.status()["connection"]
    assert state.startswith("disconnected; last: read of 4096 bytes at 0: no answer"), state
    buf = bytearray(4096)
    with trio.fail_after(DEFAULT_TIMEOUT):
        await dev.read(0, [buf])
    assert buf == b"x" * 4096 and hostile.connections == 2
    await dev.aclose()


async def test_a_request_sent_late_times_out_without_dropping_its_new_connection(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """After a reconnect that took 25 of the read's 30 s, the server answers in 10 s: the
    read fails at its deadline, but the new connection answered within 30 s of the
    request, so it is kept for the next request."""
    hostile = Hostile(Script(drop_connections=1, greet_delay=25, reply_delay=10))
    dev = await remote_on(nursery, hostile)
    started = trio.current_time()
    with trio.fail_after(10 * DEFAULT_TIMEOUT):
        error = await failure_of(dev.read(0, [bytearray(512)]))
    assert getattr(error, "errno", None) == errno.ETIMEDOUT, error
    assert trio.current_time() - started == pytest.approx(DEFAULT_TIMEOUT, abs=1)
    with trio.fail_after(DEFAULT_TIMEOUT):
        await dev.read(0, [bytearray(512)])
    assert dev.status()["connection"].startswith("connected; reconnected 1 time")
    assert hostile.connections == 2
    await dev.aclose()


async def test_every_reader_of_a_stalled_server_gets_its_answer(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    hostile = Hostile(Script(stall=Stall.BEFORE))
    dev = await remote_on(nursery, hostile)
    errors: list[Exception] = []

    async def reader(delay: float) -> None:
        await trio.sleep(delay)
        errors.append(await failure_of(dev.read(0, [bytearray(512)])))

    started = trio.current_time()
    with trio.fail_after(10 * DEFAULT_TIMEOUT):
        async with trio.open_nursery() as readers:
            readers.start_soon(reader, 0)
            readers.start_soon(reader, 5)
    assert len(errors) == 2
    assert all(getattr(e, "errno", None) == errno.ETIMEDOUT for e in errors), errors
    assert trio.current_time() - started <= 5 + DEFAULT_TIMEOUT + 1
    dev.status()  # the status can be read at any time
    hostile.release.set()
    await dev.aclose()


async def test_a_server_that_stops_reading_cannot_block_a_write(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """The request's send is shielded (never half a request on the wire); a server that
    reads nothing more kept it, and its caller, waiting forever."""
    hostile = Hostile(Script(stall=Stall.AFTER, stall_from=1, stall_on=[1]))
    dev = await remote_on(nursery, hostile, lockstep=True)
    await dev.read(0, [bytearray(512)])  # answered; then the server reads nothing more
    with trio.fail_after(10 * DEFAULT_TIMEOUT):
        error = await failure_of(dev.write(0, [bytes(64 << 10)]))
    assert getattr(error, "errno", None) == errno.ETIMEDOUT, error
    with trio.fail_after(DEFAULT_TIMEOUT):
        await dev.write(0, [bytes(64 << 10)])  # on a new connection
    await dev.aclose()


async def test_a_write_sent_late_to_a_server_that_reads_nothing_ends_at_its_deadline(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """After a reconnect that took 25 of the write's 30 s, the new connection takes none of
    the write's bytes: the (shielded) send must not outlast the write's deadline."""
    script = Script(drop_connections=1, greet_delay=25, stall=Stall.AFTER, stall_from=0,
                    stall_on=[2])  # fmt: skip
    dev = await remote_on(nursery, Hostile(script), lockstep=True)
    started = trio.current_time()
    with trio.fail_after(10 * DEFAULT_TIMEOUT):
        error = await failure_of(dev.write(0, [bytes(64 << 10)]))
    assert getattr(error, "errno", None) == errno.ETIMEDOUT, error
    assert trio.current_time() - started == pytest.approx(DEFAULT_TIMEOUT, abs=1)
    await dev.aclose()


async def test_closing_a_connection_whose_server_reads_nothing_is_bounded(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """NBD_CMD_DISC goes through the same shielded sender: it must not hold the close."""
    client = await connect(nursery, Hostile(Script(stall=Stall.AFTER, stall_from=0)), lockstep=True)
    started = trio.current_time()
    with trio.fail_after(10 * DEFAULT_TIMEOUT):
        await client.aclose()
    assert trio.current_time() - started <= 5


async def test_closing_is_bounded_and_ends_the_requests_in_flight(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    hostile = Hostile(Script(stall=Stall.DURING))
    dev = await remote_on(nursery, hostile)
    errors: list[Exception] = []

    async def reader() -> None:
        errors.append(await failure_of(dev.read(0, [bytearray(4096)])))

    with trio.fail_after(10 * DEFAULT_TIMEOUT):
        async with trio.open_nursery() as readers:
            readers.start_soon(reader)
            await hostile.stalled.wait()
            started = trio.current_time()
            await dev.aclose()
            assert trio.current_time() - started <= 5
        assert trio.current_time() - started <= 5
    assert len(errors) == 1 and isinstance(errors[0], BlockError)


# --- defect 8: reconnecting is bounded in total, and shared ------------------------------


async def test_reconnecting_to_a_server_that_never_greets_is_bounded_and_shared(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    """Each of 5 tries waited the whole 30 s handshake timeout (EIO after 153 s; two
    readers 300-330 s): a request's deadline bounds its reconnects, and readers that need
    a connection at the same time wait for one attempt."""
    hostile = Hostile(Script(greet_connections=1, close_every=1))
    dev = await remote_on(nursery, hostile)
    errors: list[Exception] = []

    async def reader() -> None:
        errors.append(await failure_of(dev.read(0, [bytearray(512)])))

    started = trio.current_time()
    with trio.fail_after(20 * DEFAULT_TIMEOUT):
        async with trio.open_nursery() as readers:
            readers.start_soon(reader)
            readers.start_soon(reader)
    assert len(errors) == 2 and all(isinstance(e, RequestFailed) for e in errors), errors
    assert trio.current_time() - started <= DEFAULT_TIMEOUT + 1
    assert hostile.connections == 2  # the first, then one attempt shared by both readers
    hostile.release.set()
    await dev.aclose()


async def test_closing_during_a_stalled_reconnect_is_bounded(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    hostile = Hostile(Script(greet_connections=1, close_every=1))
    dev = await remote_on(nursery, hostile)
    errors: list[Exception] = []

    async def reader() -> None:
        errors.append(await failure_of(dev.read(0, [bytearray(512)])))

    with trio.fail_after(10 * DEFAULT_TIMEOUT):
        async with trio.open_nursery() as readers:
            readers.start_soon(reader)
            await hostile.stalled.wait()  # the reconnect waits for a greeting
            started = trio.current_time()
            await dev.aclose()
        assert trio.current_time() - started <= 5
    assert len(errors) == 1 and isinstance(errors[0], BlockError)


async def test_listing_a_server_that_never_greets_is_bounded(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, short_tmp: Path
) -> None:
    path = str(short_tmp / "hostile.sock")
    await nursery.start(serve_unix, path, Script(greet_connections=0), None)
    started = trio.current_time()
    with trio.fail_after(10 * LIST_TIMEOUT), pytest.raises(Stalled, match="took more than 30 s"):
        await list_exports(Address(socket=path))
    assert trio.current_time() - started == pytest.approx(LIST_TIMEOUT, abs=1)


async def test_a_flush_that_times_out_is_one_that_could_not_reach_the_server(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """The mirror fails the copy on a flush error, but not on one that never reached the
    device (``Unreachable``): a flush without an answer says nothing was lost either (lost
    writes are reported by the next flush after the reconnect)."""
    dev = await remote_on(nursery, Hostile(Script(stall=Stall.BEFORE)))
    with trio.fail_after(10 * DEFAULT_TIMEOUT):
        error = await failure_of(dev.flush())
    assert isinstance(error, Unreachable) and error.errno == errno.ETIMEDOUT, error
    await dev.aclose()
