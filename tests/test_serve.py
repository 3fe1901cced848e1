"""Our NBD server in process, driven by our own client: every device kind, the contract
through a remote device, concurrency and its bounds, flush semantics across connections,
shutdown.  Fast and deterministic: events, and the autojump clock where time matters."""

from __future__ import annotations

import errno
import os
import random
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from blockfuse.block import BlockDevice, Capability, Extent
from blockfuse.devices.file import open_file
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.mirror import open_mirror
from blockfuse.devices.readonly import ReadOnlyDevice
from blockfuse.devices.remote import open_remote
from blockfuse.devices.safe import SafeDevice
from blockfuse.devices.sparse import open_sparse
from blockfuse.devices.wrapper import PassThrough
from blockfuse.errors import ReadOnly, RequestFailed
from blockfuse.nbd import constants as c
from blockfuse.nbd.events import NEED_DATA, Negotiated, ReadHole, ReadReply, Request
from blockfuse.nbd.transmission import ClientTransmission
from blockfuse.nbd.uri import parse_uri
from blockfuse.sectors import DeviceBytes
from blockfuse.serve.exports import Export, ServeBackend
from blockfuse.serve.requests import RequestHandler
from blockfuse.testing import FaultyDevice, check_block_device
from blockfuse.testing.faults import Fault
from blockfuse.testing.simulated import SimDisk
from blockfuse.transport.connection import Limits, own_payload
from blockfuse.transport.server import NBDServer
from blockfuse.transport.writer import MessageWriter

from .hostile_client import RawClient, info_data, meta_data, option, request
from .servekit import SIZE, Gate, Gauge, export_of, file_device, mem_export, serving, wait_until
from .timing import time_limit

MiB = 1 << 20
limit = time_limit(120)


async def round_trip(nursery: trio.Nursery, dev_uri: str, size: int) -> None:
    """Writes, reads, flush, trim, zero and block status agree with a bytearray."""
    remote = await open_remote(nursery, parse_uri(dev_uri))
    oracle = bytearray(size)
    await remote.read(0, [oracle])
    rng = random.Random(7)
    for _ in range(20):
        sector = rng.randrange(size // 512 - 8)
        data = rng.randbytes(512 * rng.randrange(1, 8))
        await remote.write(sector, [data])
        oracle[sector * 512 : sector * 512 + len(data)] = data
    await remote.flush()
    if Capability.WRITE_ZEROES in remote.capabilities:
        await remote.write_zeroes(8, 16)
        oracle[8 * 512 : 24 * 512] = bytes(16 * 512)
    buf = bytearray(size)
    await remote.read(0, [buf])
    assert buf == oracle
    if Capability.EXTENTS in remote.capabilities:
        extents = await remote.extents(0, size // 512)
        assert extents and extents[0].sector == 0
    await remote.aclose()


DEVICE_KINDS = ["mem", "file", "sparse", "safe", "mirror", "remote"]


@pytest.mark.parametrize("kind", DEVICE_KINDS)
async def test_our_client_on_our_server_for_every_device_kind(
    nursery: trio.Nursery, short_tmp: Path, kind: str
) -> None:
    size = 2 * MiB
    async with trio.open_nursery() as inner:
        device = await make_device(inner, kind, size, short_tmp)
        async with serving([export_of(device)], short_tmp, name="top.sock") as s:
            await round_trip(inner, s.uri(), size)
        await device.aclose()
        inner.cancel_scope.cancel()


async def make_device(nursery: trio.Nursery, kind: str, size: int, tmp: Path) -> BlockDevice:
    if kind == "mem":
        return MemoryDevice(size)
    if kind == "file":
        (tmp / "f.img").write_bytes(bytes(size))
        return open_file(str(tmp / "f.img"))
    if kind == "sparse":
        return open_sparse(str(tmp / "s.img"), size_bytes=size)
    if kind == "safe":
        return SafeDevice(MemoryDevice(size))
    if kind == "mirror":
        primary = MemoryDevice(size)
        await primary.write(0, [os.urandom(size)])
        mirror = await nursery.start(run_mirror, primary, MemoryDevice(size))
        return mirror  # type: ignore[no-any-return]
    # a remote device whose other end is another of our servers: two hops
    return await nursery.start(serve_remote, [mem_export("below", size)], tmp)  # type: ignore[no-any-return]


async def run_mirror(
    primary: BlockDevice, secondary: BlockDevice, task_status: trio.TaskStatus[BlockDevice]
) -> None:
    async with open_mirror(primary, secondary, chunk=64 << 10) as mirror:
        task_status.started(mirror)
        await trio.sleep_forever()


async def serve_remote(
    exports: list[Export], tmp: Path, task_status: trio.TaskStatus[BlockDevice]
) -> None:
    async with serving(exports, tmp, name="below.sock") as s, trio.open_nursery() as n:
        task_status.started(await open_remote(n, parse_uri(s.uri("below"))))
        await trio.sleep_forever()


async def test_the_block_contract_through_a_remote_device_on_our_server(
    short_tmp: Path,
) -> None:
    """blockfuse's conformance suite, on a remote device whose other end is our server
    (a fresh export for each device the suite makes)."""
    count = 0
    async with trio.open_nursery() as nursery:

        async def make(read_only: bool = False) -> BlockDevice:
            nonlocal count
            count += 1
            device: BlockDevice = MemoryDevice(1 * MiB)
            if read_only:
                device = ReadOnlyDevice(device)
            s = await nursery.start(serve_one, export_of(device), short_tmp, f"c{count}.sock")
            return await open_remote(nursery, parse_uri(s))

        await check_block_device(make, make_read_only_device=lambda: make(read_only=True))
        nursery.cancel_scope.cancel()


async def serve_one(
    export: Export, tmp: Path, name: str, task_status: trio.TaskStatus[str]
) -> None:
    async with serving([export], tmp, name=name) as s:
        task_status.started(s.uri())
        await trio.sleep_forever()


# --- bytes: any offset and length, shared with another front end -----------------------------


async def test_unaligned_requests_go_through_the_byte_bridge(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    export = mem_export(size=SIZE)
    async with serving([export], short_tmp) as s:
        client = await s.client(nursery)
        assert client.export.min_block == 1
        await client.pwrite(memoryview(b"abc" * 100), 1001)
        buf = memoryview(bytearray(302))
        await client.pread(buf, 1000)
        assert bytes(buf) == b"\0" + b"abc" * 100 + b"\0"
        await client.zero(1002, 3)
        await client.pread(buf[:6], 1000)
        assert bytes(buf[:6]) == b"\0a\0\0\0b"
        await client.aclose()


async def test_nbd_and_another_front_end_never_lose_each_others_bytes(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    """Concurrent partial writes to the same sectors through NBD and through the same
    ``DeviceBytes`` (what the FUSE flat file is): every byte written stays."""
    export = mem_export(size=SIZE)
    shared = export.bytes
    async with serving([export], short_tmp) as s:
        client = await s.client(nursery)

        async def over_nbd(i: int) -> None:
            await client.pwrite(memoryview(b"N" * 7), 512 * (i % 4) + 3 * i)

        async def directly(i: int) -> None:
            await shared.write(512 * (i % 4) + 300 + 3 * i, b"F" * 7)

        async with trio.open_nursery() as writers:
            for i in range(40):
                writers.start_soon(over_nbd, i)
                writers.start_soon(directly, i)
        data = bytes(await shared.read(0, 4096))
        for i in range(40):
            n, f = 512 * (i % 4) + 3 * i, 512 * (i % 4) + 300 + 3 * i
            assert data[n] == ord("N") or data[n] == ord("F")
            assert data[f + 6] in (ord("F"), ord("N"))
        buf = memoryview(bytearray(4096))
        await client.pread(buf, 0)
        assert bytes(buf) == data  # the same bytes both ways
        await client.aclose()


# --- flush semantics ----------------------------------------------------------------------


async def test_a_flush_on_one_connection_covers_writes_on_every_other(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    """CAN_MULTI_CONN is advertised because every connection shares one device object:
    a FLUSH anywhere makes every write answered before it durable."""
    disk = SimDisk(bytes(SIZE), rng=random.Random(1))
    async with serving([export_of(disk)], short_tmp) as s:
        a, b = await s.client(nursery), await s.client(nursery)
        assert a.can(c.TxFlag.CAN_MULTI_CONN)
        await a.pwrite(memoryview(b"A" * 4096), 0)
        await b.pwrite(memoryview(b"B" * 4096), 8192)
        assert disk.stable[:4096] == bytes(4096)  # answered, not yet durable
        await b.flush()
        assert disk.stable[:4096] == b"A" * 4096 and disk.stable[8192 : 8192 + 4096] == b"B" * 4096
        await a.pwrite(memoryview(b"F" * 512), 65536, fua=True)
        assert disk.stable[65536 : 65536 + 512] == b"F" * 512
        await a.aclose()
        await b.aclose()


async def test_a_lost_flush_reaches_every_connections_next_flush_once(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    faulty = FaultyDevice(MemoryDevice(SIZE))
    async with serving([export_of(faulty)], short_tmp) as s:
        a, b = await s.client(nursery), await s.client(nursery)
        await a.pwrite(memoryview(b"x" * 512), 0)
        faulty.faults.append(Fault("flush", times=1))
        with pytest.raises(RequestFailed, match="injected flush fault"):
            await a.flush()
        with pytest.raises(RequestFailed, match="injected flush fault"):
            await b.flush()  # b's writes may have been lost too
        await a.flush()
        await b.flush()  # each told once
        await a.aclose()
        await b.aclose()


async def test_device_errors_become_nbd_errors_and_the_connection_lives(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    faulty = FaultyDevice(MemoryDevice(SIZE), [Fault("read", errno.EIO, 8, 9, times=1)])
    faulty.faults.append(Fault("write", errno.EDQUOT, 16, 17, times=1))
    async with serving([export_of(faulty), export_of(ReadOnlyDevice(MemoryDevice(SIZE)), "ro")],
                       short_tmp) as s:  # fmt: skip
        client = await s.client(nursery)
        with pytest.raises(RequestFailed, match="injected read fault") as failed:
            await client.pread(memoryview(bytearray(4096)), 4096)
        assert failed.value.errno == errno.EIO
        with pytest.raises(RequestFailed) as failed:
            await client.pwrite(memoryview(bytes(512)), 16 * 512)
        assert failed.value.errno == errno.ENOSPC  # EDQUOT is not on the wire
        await client.pread(memoryview(bytearray(4096)), 4096)
        ro = await s.client(nursery, "ro")
        assert ro.export.read_only
        with pytest.raises(ReadOnly):
            await ro.pwrite(memoryview(bytes(512)), 0)
        await client.aclose()
        await ro.aclose()


# --- concurrency and its bounds ---------------------------------------------------------------


async def test_replies_leave_as_requests_complete(nursery: trio.Nursery, short_tmp: Path) -> None:
    gate = Gate(MemoryDevice(SIZE), range(0, 8))
    async with serving([export_of(gate)], short_tmp) as s:
        client = await s.client(nursery)
        done: list[int] = []

        async def read(offset: int) -> None:
            await client.pread(memoryview(bytearray(512)), offset)
            done.append(offset)

        async with trio.open_nursery() as readers:
            readers.start_soon(read, 0)
            await gate.entered.wait()
            for i in range(1, 12):
                readers.start_soon(read, i * 4096)
            await wait_until(lambda: len(done) == 11)
            assert 0 not in done  # the held one did not hold the others back
            gate.release.set()
        assert done[-1] == 0
        await client.aclose()


async def test_the_writer_writes_each_message_whole_whoever_waits() -> None:
    """Many tasks hand over messages while a slow reader takes a little at a time: each
    message arrives whole, never cut by another."""
    sending, receiving = trio.testing.lockstep_stream_pair()
    writer = MessageWriter(sending, None, "test", timeout=30)
    messages = [bytes([i]) * (3000 + 7 * i) for i in range(60)]
    got = bytearray()

    async def read_slowly() -> None:
        while len(got) < sum(map(len, messages)):
            got.extend(await receiving.receive_some(997))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_slowly)
        for message in messages:
            nursery.start_soon(writer.write, [message[:1000], message[1000:]])
            await trio.lowlevel.checkpoint()
    at = 0
    while at < len(got):
        size = 3000 + 7 * got[at]
        assert got[at : at + size] == bytes([got[at]]) * size, f"message cut at {at}"
        at += size


async def test_replies_made_at_once_still_go_out_when_the_client_half_closes(
    short_tmp: Path,
) -> None:
    """Writes the reader answers itself, then the client's end of stream in the same
    read: their replies are written before the connection ends, not dropped."""
    count = 8
    writes = b"".join(
        request(c.Cmd.WRITE, i * 4096, 4096, cookie=i) + bytes([i]) * 4096 for i in range(count)
    )
    async with (
        file_device(short_tmp / "disk.img") as dev,
        serving([export_of(dev)], short_tmp) as s,
        await RawClient.connect(str(s.address.path)) as raw,
    ):
        await raw.go(structured=False)
        sock = raw.stream.socket
        assert os.write(sock.fileno(), writes) == len(writes)  # no await: the server reads
        sock.shutdown(socket.SHUT_WR)  # the requests and the end together
        assert [await raw.simple_reply() for _ in range(count)] == [(0, i) for i in range(count)]


async def test_held_messages_leave_with_the_next_write_in_order() -> None:
    """What is held is not written until ``flush`` or another ``write``, which takes it
    along, first; ``drop_held`` gives back what will never be written."""
    sending, receiving = trio.testing.memory_stream_pair()
    writer = MessageWriter(sending, None, "test", timeout=30)
    done: list[str] = []
    writer.hold([b"a"], lambda: done.append("a"))
    writer.hold([b"b"], lambda: done.append("b"))
    with trio.move_on_after(0.01):
        assert await receiving.receive_some(10) == b"", "nothing written yet"
    await writer.write([b"c"], lambda: done.append("c"))
    assert (await receiving.receive_some(10), done) == (b"abc", ["a", "b", "c"])
    writer.hold([b"d"], lambda: done.append("d"))
    await writer.flush()
    assert (await receiving.receive_some(10), done[-1]) == (b"d", "d")
    writer.hold([b"e"], lambda: done.append("e"))
    writer.drop_held()
    await writer.flush()
    assert done[-1] == "e"
    with trio.move_on_after(0.01):
        assert await receiving.receive_some(10) == b"", "a dropped message is not written"


async def test_the_reader_writes_its_own_replies_before_it_waits_for_a_slot(
    short_tmp: Path,
) -> None:
    """Writes and reads a file answers at once, many more than the connection's request
    slots, sent in one go: the reader's own replies hold the slots until written, so it
    writes them when it runs out (and before it waits for more requests) instead of
    waiting for slots only its replies would free."""
    count = 40
    data = [random.Random(i).randbytes(4096) for i in range(count)]
    writes = b"".join(
        request(c.Cmd.WRITE, i * 4096, 4096, cookie=i) + data[i] for i in range(count)
    )
    reads = b"".join(request(c.Cmd.READ, i * 4096, 4096, cookie=100 + i) for i in range(count))
    async with (
        file_device(short_tmp / "disk.img") as dev,
        serving([export_of(dev)], short_tmp, limits=Limits(requests=2)) as s,
        await RawClient.connect(str(s.address.path)) as raw,
    ):
        await raw.go(structured=False)
        with trio.fail_after(10):
            await raw.send(writes)
            assert [await raw.simple_reply() for _ in range(count)] == [
                (0, i) for i in range(count)
            ]
            await raw.send(reads)
            for i in range(count):
                assert await raw.simple_reply() == (0, 100 + i)
                assert await raw.receive(4096) == data[i]


async def test_the_writer_hands_over_to_its_waiter_not_to_a_newcomer() -> None:
    """A writer that finishes passes the stream to the task waiting for it; a task that
    asks just then, before the waiter ran, waits too (it once wrote at the same time).
    The two become ready in one batch, run in either order: 20 tries."""
    for _ in range(20):
        assert await hand_over_once() == b"A" * 5000 + b"B" * 5000 + b"C" * 5000


async def hand_over_once() -> bytes:
    sending, receiving = trio.testing.lockstep_stream_pair()
    writer = MessageWriter(sending, None, "test", timeout=30)
    newcomer_may_ask = trio.Event()
    got = bytearray()

    async def read() -> None:
        got.extend(await receiving.receive_some(1 << 20))  # all of the first message
        newcomer_may_ask.set()  # ready in the same batch as the waiter
        while len(got) < 3 * 5000:
            got.extend(await receiving.receive_some(1 << 20))

    async def newcomer() -> None:
        await newcomer_may_ask.wait()
        await writer.write([b"C" * 2500, b"C" * 2500])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.write, [b"A" * 5000])
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(writer.write, [b"B" * 2500, b"B" * 2500])
        nursery.start_soon(newcomer)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(read)
    return bytes(got)


async def test_big_replies_in_flight_together_are_never_interleaved(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    """Replies larger than the socket takes at once are written in pieces; another reply
    ready meanwhile must wait for the whole of the one under way."""
    device = MemoryDevice(32 * MiB)
    for i in range(32):
        await device.write(i * 2048, [bytes([i]) * MiB])
    async with serving([export_of(device)], short_tmp) as s:
        client = await s.client(nursery)
        bufs = [memoryview(bytearray(MiB)) for _ in range(32)]
        for _ in range(3):
            async with trio.open_nursery() as readers:
                for i, buf in enumerate(bufs):
                    readers.start_soon(client.pread, buf, i * MiB)
            assert all(bytes(buf) == bytes([i]) * MiB for i, buf in enumerate(bufs))
        await client.aclose()


@pytest.mark.parametrize(
    ("limits", "size", "most"),
    [
        (Limits(requests=4), 4096, 4),
        (Limits(connection_bytes=1 * MiB), 256 << 10, 4),
        (Limits(server_bytes=512 << 10), 256 << 10, 2),
    ],
    ids=["requests", "connection-bytes", "server-bytes"],
)
async def test_requests_and_bytes_in_flight_are_bounded(
    nursery: trio.Nursery, short_tmp: Path, limits: Limits, size: int, most: int
) -> None:
    gauge = Gauge(MemoryDevice(8 * MiB))
    async with serving([export_of(gauge)], short_tmp, limits=limits) as s:
        client = await s.client(nursery)
        async with trio.open_nursery() as readers:
            for i in range(16):
                readers.start_soon(client.pread, memoryview(bytearray(size)), i * size)
            await wait_until(lambda: gauge.inside == most)
            await trio.testing.wait_all_tasks_blocked(0.05)  # more would be in by now
            assert gauge.most == most
            gauge.release.set()
        await client.aclose()


async def test_disc_answers_what_is_in_flight_then_closes(short_tmp: Path) -> None:
    gate = Gate(MemoryDevice(SIZE), range(0, 1))
    async with (
        serving([export_of(gate)], short_tmp) as s,
        await RawClient.connect(str(s.address.path)) as raw,
    ):
        await raw.go(structured=False)
        await raw.send(request(c.Cmd.READ, 0, 512, cookie=7) + request(c.Cmd.DISC))
        await gate.entered.wait()
        gate.release.set()
        assert await raw.simple_reply() == (0, 7)
        assert await raw.receive(512) == bytes(512)
        assert await raw.closed()


async def test_holes_go_out_as_holes_where_the_device_finds_them_cheaply(
    short_tmp: Path,
) -> None:
    class Holey(PassThrough):
        """Everything but the second 4 KiB reads as a hole, and says so cheaply."""

        def __init__(self, inner: BlockDevice) -> None:
            super().__init__(inner)
            self.cheap_extents = True
            self.capabilities = frozenset({Capability.EXTENTS})

        async def extents(self, sector: int, count: int) -> list[Extent]:
            return [Extent(0, 8, False), Extent(8, 8, True), Extent(16, 1 << 20, False)]

    inner = MemoryDevice(SIZE)
    await inner.write(8, [b"d" * 4096])
    async with (
        serving([export_of(Holey(inner))], short_tmp) as s,
        await RawClient.connect(str(s.address.path)) as raw,
    ):
        await raw.greet()
        await raw.ask(option(c.Opt.STRUCTURED_REPLY))
        await raw.ask(option(c.Opt.SET_META_CONTEXT, meta_data("disk", c.BASE_ALLOCATION)))
        replies = await raw.ask(option(c.Opt.GO, info_data("disk")))
        export = ClientTransmission(negotiated(replies)).export
        tx = ClientTransmission(Negotiated(export, True, {c.BASE_ALLOCATION: 1}))
        for flags in (c.NO_CMD_FLAGS, c.CmdFlag.DF):
            _, header = tx.request(c.Cmd.READ, 1000, 12000, flags)
            await raw.send(header)
            events = []
            while not events or events[-1].__class__.__name__ != "Done":
                tx.receive_data(raw.buf or await raw.stream.receive_some(1 << 16))
                raw.buf = b""
                while (e := tx.next_event()) is not NEED_DATA:
                    events.append(e)
            holes = [(e.offset, e.length) for e in events if isinstance(e, ReadHole)]
            assert holes == ([] if flags else [(1000, 4096 - 1000), (8192, 12000 + 1000 - 8192)])


class PartialExtents(PassThrough):
    """Cheap extents that say less than was asked: ``found`` for any query."""

    def __init__(self, inner: BlockDevice, found: list[Extent]) -> None:
        super().__init__(inner)
        self.cheap_extents = True
        self.capabilities = frozenset({Capability.EXTENTS})
        self.found = found

    async def extents(self, sector: int, count: int) -> list[Extent]:
        return self.found


@pytest.mark.parametrize(
    "found",
    [[Extent(0, 8, False)], [Extent(0, 8, False), Extent(16, 8, True)], []],
    ids=["stops-early", "gap", "nothing"],
)
async def test_a_read_reply_covers_the_whole_range_whatever_the_extents_say(
    found: list[Extent],
) -> None:
    inner = MemoryDevice(SIZE)
    await inner.write(8, [b"d" * 8192])
    handler = RequestHandler(DeviceBytes(PartialExtents(inner, found)), structured=True)
    reply = await handler.handle(Request(1, c.Cmd.READ, 0, 1000, 65536))
    assert isinstance(reply, ReadReply) and reply.error == 0
    got = b"".join(bytes(p) for p in reply.pieces)  # a hole (an int) reads as zeroes
    assert got == bytes(inner.data[1000 : 1000 + 65536])


def negotiated(replies: list[object]) -> Negotiated:
    from blockfuse.nbd.events import ExportInfo
    from blockfuse.nbd.options import apply_info

    info = ExportInfo("disk")
    for r in replies:
        if r.rtype == c.Rep.INFO:  # type: ignore[attr-defined]
            data = r.data  # type: ignore[attr-defined]
            info = apply_info(info, c.U16.unpack(data[:2])[0], data)
    return Negotiated(info, True, {c.BASE_ALLOCATION: 1})


# --- shutdown -------------------------------------------------------------------------------


async def test_shutdown_answers_new_requests_eshutdown_and_lets_in_flight_ones_finish(
    short_tmp: Path,
) -> None:
    gate = Gate(MemoryDevice(SIZE), range(0, 1))
    async with serving([export_of(gate)], short_tmp) as s:
        server = s.serving.server
        raw = await RawClient.connect(str(s.address.path))
        idle = await RawClient.connect(str(s.address.path))
        hand = await RawClient.connect(str(s.address.path))
        await raw.go(structured=False)
        await idle.go(structured=False)
        await hand.greet()
        await raw.send(request(c.Cmd.READ, 0, 512, cookie=1))
        await gate.entered.wait()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.shutdown, 30)
            assert await idle.closed()  # nothing in flight: closed at once
            replies = await hand.ask(option(c.Opt.LIST))
            assert [r.rtype for r in replies] == [c.Rep.ERR_SHUTDOWN]
            await hand.ask(option(c.Opt.ABORT))
            await raw.send(request(c.Cmd.READ, 4096, 512, cookie=2))
            assert await raw.simple_reply() == (errno.ESHUTDOWN, 2)
            gate.release.set()
            assert await raw.simple_reply() == (0, 1)
            await raw.receive(512)
            assert await raw.closed()
        assert server.connections == 0
        for r in (raw, idle, hand):
            await r.stream.aclose()


async def test_the_grace_bounds_a_shutdown(autojump_clock: object) -> None:
    gate = Gate(MemoryDevice(SIZE), range(0, 1))
    server = NBDServer(ServeBackend([export_of(gate)]))
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, server_end)
        raw = RawClient(client_end)
        await raw.go()
        await raw.send(request(c.Cmd.READ, 0, 512))
        await gate.entered.wait()  # and never released
        started = trio.current_time()
        await server.shutdown(grace=10)
        assert trio.current_time() - started == pytest.approx(10)
        assert await raw.closed()


async def take_slowly(stream: trio.abc.ReceiveStream) -> None:
    """A live reader far too slow for what it asked: 2 KiB a second."""
    data = await stream.receive_some(2048)
    while data:
        await trio.sleep(1)
        data = await stream.receive_some(2048)


@pytest.mark.parametrize(
    ("reads", "sizes"),
    [(False, [SIZE]), (True, [32 << 10] * 16)],
    ids=["reads-nothing", "reads-slowly"],
)
async def test_a_shutdown_ends_in_bounded_time_whatever_a_client_reads(
    autojump_clock: object, reads: bool, sizes: list[int]
) -> None:
    """Replies a client does not take, or takes so slowly that none of them stalls for
    the send timeout, cannot hold a shutdown long past its grace: they are cut off soon
    after the hurry."""
    server = NBDServer(ServeBackend([mem_export()]))
    client_end, server_end = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, server_end)
        raw = RawClient(client_end)
        await raw.go()
        for cookie, size in enumerate(sizes):
            await raw.send(request(c.Cmd.READ, 0, size, cookie=cookie))
        if reads:
            nursery.start_soon(take_slowly, client_end)
        started = trio.current_time()
        with trio.fail_after(600):
            await server.shutdown(grace=10)
        assert trio.current_time() - started < 10 + 5
        assert server.connections == 0
        nursery.cancel_scope.cancel()


# --- a mirror served while it copies ----------------------------------------------------------


async def test_a_mirror_served_while_it_copies(nursery: trio.Nursery, short_tmp: Path) -> None:
    size = 4 * MiB
    primary, secondary = MemoryDevice(size), MemoryDevice(size)
    await primary.write(0, [os.urandom(size)])
    async with (
        open_mirror(primary, secondary, chunk=64 << 10, rate=8 * MiB) as mirror,
        serving([export_of(mirror, spec="mirror(...)")], short_tmp) as s,
    ):
        client = await s.client(nursery)
        rng = random.Random(3)
        for _ in range(50):
            offset = rng.randrange(size - 5000)
            await client.pwrite(memoryview(rng.randbytes(rng.randrange(1, 5000))), offset)
        assert mirror.status()["state"] == "copying"
        with trio.fail_after(30):
            await mirror.wait_synced()
        await client.flush()
        exported = bytearray(size)
        await client.pread(memoryview(exported), 0)
        assert primary.data == secondary.data == bytes(exported)
        await client.aclose()


async def test_a_read_of_cached_file_data_is_answered_at_once(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    async with file_device(image, random.Random(7).randbytes(SIZE)) as dev:
        handler = RequestHandler(DeviceBytes(SafeDevice(dev)), structured=True)
        assert image.read_bytes()  # now in the page cache
        reply = handler.answer_now(Request(1, c.Cmd.READ, 0, 8192, 4096))
        assert isinstance(reply, ReadReply) and reply.error == 0
        assert bytes(reply.pieces[0]) == image.read_bytes()[8192 : 8192 + 4096]
        handler.written(reply)


@pytest.mark.parametrize(
    ("offset", "length", "why"),
    [(100, 4096, "a part sector"), (SIZE - 512, 4096, "past the end"), (0, 0, "nothing")],
)
async def test_a_read_the_file_cannot_do_at_once_is_left_to_handle(
    tmp_path: Path, offset: int, length: int, why: str
) -> None:
    async with file_device(tmp_path / "disk.img") as dev:
        handler = RequestHandler(DeviceBytes(SafeDevice(dev)), structured=True)
        assert handler.answer_now(Request(1, c.Cmd.READ, 0, offset, length)) is None, why


async def test_a_write_of_whole_sectors_to_a_file_is_answered_at_once(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    async with file_device(image) as dev:
        handler = RequestHandler(DeviceBytes(SafeDevice(dev)), structured=True)
        data = random.Random(8).randbytes(4096)
        reply = handler.answer_now(Request(1, c.Cmd.WRITE, 0, 8192, 4096, data))
        assert reply is not None and reply.error == 0
        assert image.read_bytes()[8192 : 8192 + 4096] == data


@pytest.mark.parametrize(
    ("offset", "length", "flags", "why"),
    [
        (100, 4096, 0, "a part sector"),
        (SIZE - 512, 4096, 0, "past the end"),
        (0, 0, 0, "nothing"),
        (0, 4096, c.CmdFlag.FUA, "FUA: the flush is awaited"),
    ],
)
async def test_a_write_the_file_cannot_do_at_once_is_left_to_handle(
    tmp_path: Path, offset: int, length: int, flags: int, why: str
) -> None:
    image = tmp_path / "disk.img"
    async with file_device(image) as dev:
        handler = RequestHandler(DeviceBytes(SafeDevice(dev)), structured=True)
        req = Request(1, c.Cmd.WRITE, flags, offset, length, b"x" * length)
        assert handler.answer_now(req) is None, why
        assert image.read_bytes() == bytes(SIZE), why


async def test_a_write_is_not_answered_at_once_on_a_read_only_file(tmp_path: Path) -> None:
    async with file_device(tmp_path / "disk.img", read_only=True) as dev:
        handler = RequestHandler(DeviceBytes(dev), structured=True)
        assert handler.answer_now(Request(1, c.Cmd.WRITE, 0, 0, 4096, b"x" * 4096)) is None
        with pytest.raises(ReadOnly):
            await dev.write(0, [b"x" * 4096])


async def test_a_write_waits_its_turn_while_another_write_holds_sectors(tmp_path: Path) -> None:
    """A write in flight through the bridge (here: sectors held, as a WRITE_ZEROES or a
    read-modify-write holds them) sends every write to ``handle``, which takes the range
    lock: none overtakes a write that holds sectors it touches."""
    image = tmp_path / "disk.img"
    async with file_device(image) as dev:
        bytes_ = DeviceBytes(SafeDevice(dev))
        handler = RequestHandler(bytes_, structured=True)
        async with bytes_.holding(0, 8):
            assert handler.answer_now(Request(1, c.Cmd.WRITE, 0, 0, 4096, b"x" * 4096)) is None
        assert image.read_bytes() == bytes(SIZE)
        assert handler.answer_now(Request(2, c.Cmd.WRITE, 0, 0, 4096, b"y" * 4096)) is not None
        assert image.read_bytes()[:4096] == b"y" * 4096


async def test_a_zero_write_to_a_sparse_device_stays_a_hole(tmp_path: Path) -> None:
    """A sparse image keeps zeroes as holes: its writes are never the raw file's."""
    image = tmp_path / "s.img"
    dev = open_sparse(str(image), size_bytes=4 * MiB)
    try:
        handler = RequestHandler(DeviceBytes(SafeDevice(dev)), structured=True)
        before = os.stat(image).st_blocks
        req = Request(1, c.Cmd.WRITE, 0, MiB, 64 << 10, bytes(64 << 10))
        reply = handler.answer_now(req) or await handler.handle(req)
        assert reply.error == 0
        assert os.stat(image).st_blocks == before, "zeroes were written into the file"
    finally:
        await dev.aclose()


async def test_a_write_past_a_shrunk_sparse_device_is_refused(tmp_path: Path) -> None:
    """A connection that still believes the old size: the write past the new end fails
    (ENOSPC), and the backing file does not grow past the device."""
    image = tmp_path / "s.img"
    dev = open_sparse(str(image), size_bytes=4 * MiB)
    try:
        bytes_ = DeviceBytes(SafeDevice(dev))
        handler = RequestHandler(bytes_, structured=True)
        await bytes_.resize(MiB)
        req = Request(1, c.Cmd.WRITE, 0, 2 * MiB, 4096, b"x" * 4096)
        reply = handler.answer_now(req) or await handler.handle(req)
        assert os.path.getsize(image) <= MiB, "the backing file grew past the device"
        assert reply.error != 0, "a write past the end was acknowledged"
    finally:
        await dev.aclose()


async def test_only_a_device_that_says_so_answers_at_once() -> None:
    handler = RequestHandler(DeviceBytes(MemoryDevice(SIZE)), structured=True)
    assert handler.answer_now(Request(1, c.Cmd.READ, 0, 0, 4096)) is None
    assert handler.answer_now(Request(2, c.Cmd.WRITE, 0, 0, 4096, b"x" * 4096)) is None
    wrapped = RequestHandler(DeviceBytes(PassThrough(MemoryDevice(SIZE))), structured=True)
    assert wrapped.answer_now(Request(1, c.Cmd.READ, 0, 0, 4096)) is None
    assert wrapped.answer_now(Request(2, c.Cmd.WRITE, 0, 0, 4096, b"x" * 4096)) is None


async def test_writes_that_came_with_their_payload_count_their_bytes(short_tmp: Path) -> None:
    """WRITEs whose payloads came whole with their headers (handed out at once, without
    PayloadComing) hold their bytes of the connection's budget as any other: 8 of 4 KiB
    in one send on a connection of 16 KiB, at most 4 inside the device at once."""
    gauge = Gauge(MemoryDevice(SIZE), writes=True)
    writes = b"".join(
        request(c.Cmd.WRITE, i * 4096, 4096, cookie=i) + bytes([i]) * 4096 for i in range(8)
    )
    limits = Limits(connection_bytes=16 << 10)
    async with (
        serving([export_of(gauge)], short_tmp, limits=limits) as s,
        await RawClient.connect(str(s.address.path)) as raw,
    ):
        await raw.go(structured=False)
        await raw.send(writes)
        await wait_until(lambda: gauge.inside == 4)
        await trio.testing.wait_all_tasks_blocked(0.05)  # more would be in by now
        assert gauge.most == 4
        gauge.release.set()
        assert {await raw.simple_reply() for _ in range(8)} == {(0, i) for i in range(8)}


def test_a_waiting_write_keeps_only_its_own_payload_alive() -> None:
    """A payload handed out as a view of what was received is copied before the WRITE
    waits in a task: it must not keep the whole piece it came in alive."""
    piece = bytes(range(256)) * 512
    req = Request(1, c.Cmd.WRITE, 0, 0, 4096, memoryview(piece)[4096:8192])
    own = own_payload(req)
    assert isinstance(own.data, bytes) and own.data == piece[4096:8192]
    whole = Request(2, c.Cmd.WRITE, 0, 0, 4096, memoryview(bytearray(4096)))
    assert own_payload(whole) is whole  # a buffer of its own already
