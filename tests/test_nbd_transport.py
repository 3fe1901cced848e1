"""The trio NBD client against an in-process server: concurrency, errors, reconnects."""

from __future__ import annotations

import errno
import itertools
import os

import pytest
import trio
import trio.testing
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from blockfuse.block import BlockDevice, Capability, Extent
from blockfuse.devices.remote import RemoteDevice, to_extents
from blockfuse.errors import Disconnected, ProtocolError, RequestFailed
from blockfuse.nbd.constants import STATE_ZERO, TxFlag
from blockfuse.nbd.uri import Address
from blockfuse.testing import check_block_device
from blockfuse.transport.connect import wrap_nbd_stream
from blockfuse.transport.reconnect import Reconnecting

from .nbdpair import FULL_FLAGS, drain
from .nbdserver import FakeServer


async def remote(nursery: trio.Nursery, server: FakeServer, **kw: float) -> RemoteDevice:
    first = await server.connect(nursery)
    link = Reconnecting(nursery, server.connect, first, **kw)  # type: ignore[arg-type]
    return RemoteDevice(link, Address("disk", socket="/fake"))


@pytest.mark.parametrize("structured", [True, False])
async def test_remote_device_conforms(nursery: trio.Nursery, structured: bool) -> None:
    async def make() -> BlockDevice:
        return await remote(nursery, FakeServer(structured=structured))

    async def make_ro() -> BlockDevice:
        flags = FULL_FLAGS | TxFlag.READ_ONLY
        return await remote(nursery, FakeServer(flags=flags, structured=structured))

    await check_block_device(make, make_read_only_device=make_ro)


async def test_big_requests_are_split(nursery: trio.Nursery) -> None:
    server = FakeServer(8 << 20)
    client = await server.connect(nursery)
    client._tx.max_payload = 64 << 10  # as if the server advertised a 64 KiB maximum
    data = os.urandom(3 << 20)
    with trio.fail_after(10):
        await client.pwrite(memoryview(data), 4096)
        buf = bytearray(3 << 20)
        await client.pread(memoryview(buf), 4096)
    assert buf == data
    assert server.largest_request == 64 << 10
    await client.aclose()


async def test_many_concurrent_callers(nursery: trio.Nursery) -> None:
    server = FakeServer()
    client = await server.connect(nursery)
    blobs = {i: os.urandom(4096) for i in range(64)}

    async def one(i: int) -> None:
        await client.pwrite(memoryview(blobs[i]), i * 4096)
        buf = bytearray(4096)
        await client.pread(memoryview(buf), i * 4096)
        assert buf == blobs[i]

    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            for i in blobs:
                inner.start_soon(one, i)
    await client.aclose()


async def test_server_error_fails_one_request(nursery: trio.Nursery) -> None:
    server = FakeServer()
    dev = await remote(nursery, server)
    server.read_errno = errno.EIO
    with trio.fail_after(5), pytest.raises(RequestFailed) as info:
        await dev.read(0, [bytearray(512)])
    assert info.value.errno == errno.EIO and "injected" in str(info.value)
    server.read_errno = 0
    await dev.read(0, [bytearray(512)])
    assert server.connections == 1
    await dev.aclose()


async def test_close_waits_for_replies_then_sends_disc(nursery: trio.Nursery) -> None:
    server = FakeServer()
    dev = await remote(nursery, server)
    with trio.fail_after(5):
        async with trio.open_nursery() as inner:
            inner.start_soon(dev.write, 0, [os.urandom(4096)])
            await trio.testing.wait_all_tasks_blocked()
            await dev.aclose()
        await server.disconnected.wait()
    assert server.requests == 1 and server.disconnects == 1  # write answered, then DISC
    with pytest.raises(Disconnected):
        await dev.read(0, [bytearray(512)])


async def test_eshutdown_sends_disc_and_reconnects(nursery: trio.Nursery) -> None:
    server = FakeServer()
    dev = await remote(nursery, server, backoff=0.01)
    server.read_errno = errno.ESHUTDOWN  # one read answered "shutting down"
    with trio.fail_after(5):
        await dev.read(0, [bytearray(512)])
        await server.disconnected.wait()
    assert server.connections == 2 and server.disconnects == 1
    await dev.aclose()


async def test_extents_from_block_status(nursery: trio.Nursery) -> None:
    server = FakeServer()
    dev = await remote(nursery, server)
    assert Capability.EXTENTS in dev.capabilities
    await dev.write(16, [os.urandom(4096)])
    with trio.fail_after(5):
        extents = await dev.extents(0, 64)
    assert extents == [Extent(0, 16, False), Extent(16, 8, True), Extent(24, 40, False)]
    await dev.aclose()


async def test_dropped_connection_is_retried(nursery: trio.Nursery) -> None:
    server = FakeServer()
    dev = await remote(nursery, server, backoff=0.01)
    server.drop_after = server.requests + 1
    data = os.urandom(8192)
    with trio.fail_after(10):
        await dev.write(0, [data[:4096], data[4096:]])
        buf = bytearray(8192)
        await dev.read(0, [buf])
    assert buf == data
    assert server.connections == 2 and dev.status()["reconnects"] == "1"
    await dev.aclose()


async def test_retry_budget_then_eio_then_recovery(nursery: trio.Nursery) -> None:
    server = FakeServer()
    dev = await remote(nursery, server, retries=3, backoff=0.01)
    server.drop_after = server.requests
    server.up = False
    with trio.fail_after(10), pytest.raises(RequestFailed) as info:
        await dev.read(0, [bytearray(512)])
    assert info.value.errno == errno.EIO and "after 3 retries" in str(info.value)
    server.up = True
    with trio.fail_after(10):
        await dev.read(0, [bytearray(512)])
    await dev.aclose()


async def test_protocol_violation_fails_in_flight_requests(nursery: trio.Nursery) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    fake = FakeServer()

    async def evil() -> None:
        await handshake_on(server_end, fake)
        await server_end.receive_some(28)
        await server_end.send_all(b"\x67\x44\x66\x98" + bytes(4) + b"\xde\xad" * 4)

    nursery.start_soon(evil)
    with trio.fail_after(5):
        client = await wrap_nbd_stream(nursery, client_end, "disk", server="evil")
    with trio.fail_after(5), pytest.raises(ProtocolError, match="evil: reply for unknown cookie"):
        await client.pread(memoryview(bytearray(512)), 0)
    assert client.broken is not None
    with trio.fail_after(5):  # a hard disconnect at once, not at the next request or close
        assert await server_end.receive_some(1 << 16) == b""
    await client.aclose()


async def handshake_on(stream: trio.testing.MemoryStapledStream, fake: FakeServer) -> None:
    """The server's half of the handshake, by the server core; then raw bytes follow."""
    from blockfuse.nbd.server import ServerCore

    core = ServerCore([fake.export])
    await stream.send_all(core.data_to_send())
    while not core.transmitting:
        core.receive_data(await stream.receive_some(1 << 16))
        drain(core)
        await stream.send_all(core.data_to_send())


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = await stream.receive_some(n - len(data))
        assert more, f"the stream ended after {len(data)} of {n} bytes"
        data += more
    return data


async def test_eshutdown_waits_for_the_other_replies_then_sends_disc(
    nursery: trio.Nursery,
) -> None:
    """The spec: on NBD_ESHUTDOWN the client MUST soft-disconnect (DISC, not a drop)."""
    from blockfuse.nbd import constants as c

    client_end, server_end = trio.testing.memory_stream_pair()
    last_message: list[bytes] = []

    async def shutting_down() -> None:
        await handshake_on(server_end, FakeServer())
        first, second = [c.REQUEST.unpack(await receive_exactly(server_end, 28)) for _ in "ab"]
        await server_end.send_all(c.SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, 108, first[3]))
        await trio.sleep(0.2)
        reply = c.SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, 0, second[3])
        await server_end.send_all(reply + b"x" * second[5])
        last_message.append(await receive_exactly(server_end, 28))

    nursery.start_soon(shutting_down)
    with trio.fail_after(5):
        client = await wrap_nbd_stream(nursery, client_end, "disk", server="fake")
    results: dict[str, object] = {}

    async def read(name: str) -> None:
        buf = bytearray(512)
        try:
            await client.pread(memoryview(buf), 0)
            results[name] = bytes(buf)
        except Exception as exc:
            results[name] = exc

    with trio.fail_after(5):
        async with trio.open_nursery() as inner:
            inner.start_soon(read, "a")
            await trio.testing.wait_all_tasks_blocked()
            inner.start_soon(read, "b")
            await trio.testing.wait_all_tasks_blocked()
            await client.aclose()  # what a reconnect does after the first read's ESHUTDOWN
    assert "shutting down" in str(results["a"]) and results["b"] == b"x" * 512
    assert c.REQUEST.unpack(last_message[0])[2] == c.Cmd.DISC


async def test_a_flush_after_losing_acknowledged_writes_fails(nursery: trio.Nursery) -> None:
    """Writes acknowledged on a lost connection may be lost with it: the next flush says so."""
    server = FakeServer()
    dev = await remote(nursery, server, backoff=0.01)
    with trio.fail_after(10):
        await dev.write(0, [os.urandom(4096)])
        server.drop_after = server.requests  # the flush's connection drops
        with pytest.raises(RequestFailed, match="no flush had covered") as info:
            await dev.flush()
        assert info.value.errno == errno.EIO and server.connections == 2
        await dev.flush()  # said once, like fsync after a lost page

        await dev.write(0, [os.urandom(4096)])
        await dev.flush()
        server.drop_after = server.requests  # now nothing acknowledged is unflushed
        await dev.read(0, [bytearray(512)])
        await dev.flush()
    assert server.connections == 3
    await dev.aclose()


async def test_a_reconnect_to_a_changed_export_is_refused(nursery: trio.Nursery) -> None:
    from dataclasses import replace

    server = FakeServer()
    dev = await remote(nursery, server, backoff=0.01, retries=2)
    server.export = replace(server.export, size=2 << 20)  # restarted with another image
    server.drop_after = server.requests
    with trio.fail_after(10), pytest.raises(RequestFailed, match="size changed from 1048576"):
        await dev.read(0, [bytearray(512)])
    server.export = replace(server.export, size=1 << 20)  # the right image is back
    with trio.fail_after(10):
        await dev.read(0, [bytearray(512)])
    await dev.aclose()


# --- block status as sector extents ---------------------------------------------------------

EXTENTS = st.lists(
    st.tuples(st.integers(1, 3 * 4096), st.sampled_from([0, 1, 2, 3])), min_size=1, max_size=8
)


@settings(max_examples=500, deadline=None)
@given(EXTENTS, st.integers(0, 4), st.integers(1, 24), st.sampled_from([512, 4096]))
def test_block_status_becomes_safe_and_exact_sector_extents(
    found: list[tuple[int, int]], sector: int, count: int, ss: int
) -> None:
    """A sector is a hole exactly when every byte of it is known to read as zeroes (the
    server's extents may end anywhere inside a sector, and may stop short); anything
    else is data, which is always safe to read."""
    assume(sum(n for n, _ in found[:-1]) < count * ss)  # what the core lets through
    zero = bytearray()  # per byte from the sector: 1 known zero, 0 data; unknown past the end
    for length, flags in found:
        zero += bytes([1 if flags & STATE_ZERO else 0]) * length
    out = to_extents(found, sector, count, ss)
    assert out and out[0].sector == sector and out[-1].end <= sector + count
    for a, b in itertools.pairwise(out):
        assert a.end == b.sector and a.is_data != b.is_data
    known = min(len(zero) // ss, count)  # sectors every byte of which the server described
    assert out[-1].end - sector >= max(known, 1)
    for extent in out:
        for s in range(extent.sector - sector, extent.end - sector):
            block = zero[s * ss : (s + 1) * ss]
            all_zero = len(block) == ss and all(block)
            assert extent.is_data != all_zero, (s, extent)


def test_a_hole_ending_inside_a_sector_leaves_that_sector_data() -> None:
    """The two ways this once went wrong: the sector holding a hole's last bytes and the
    next extent's first ones was called a hole (a mirror skipped its data), and a long
    hole ending inside a sector was called data all along (copied as zeroes)."""
    assert to_extents([(1000, 3), (24, 0)], 0, 2, 512) == [
        Extent(0, 1, False),
        Extent(1, 1, True),
    ]
    assert to_extents([((1 << 30) + 100, 3), (1 << 20, 0)], 0, 4 << 20, 512)[:2] == [
        Extent(0, 1 << 21, False),
        Extent(1 << 21, 2049, True),
    ]
