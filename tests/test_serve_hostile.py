"""Hostile clients against the server over real sockets: garbage, lies, floods, stalls
and vanishing acts, each from a scripted client (``hostile_client.py``).  Each time the
offender loses its own connection, memory stays within our bounds, the server stays up
and a well-behaved client on the same server carries on."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.testing

from blockfuse.devices.memory import MemoryDevice
from blockfuse.nbd import constants as c
from blockfuse.serve.exports import ServeBackend
from blockfuse.transport.connection import Limits
from blockfuse.transport.handshake import ConnectionLost
from blockfuse.transport.server import NBDServer

from .hostile_client import RawClient, info_data, option, request
from .servekit import Gate, export_of, mem_export, serving, wait_until

MiB = 1 << 20


async def test_a_client_that_breaks_the_protocol_loses_only_its_own_connection(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    async with serving([mem_export()], short_tmp) as s:
        good = await s.client(nursery)
        async with await RawClient.connect(str(s.address.path)) as bad:
            await bad.go()
            await bad.send(b"GARBAGE!" * 10)
            assert await bad.closed()
        await good.pwrite(memoryview(b"still here"), 0)
        await good.aclose()


async def test_a_stalled_handshake_is_dropped_after_the_timeout(autojump_clock: object) -> None:
    server = NBDServer(ServeBackend([mem_export()]))
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, server_end)
        raw = RawClient(client_end)
        await raw.greet()
        await raw.send(option(c.Opt.GO)[:10])  # half an option header, then nothing
        started = trio.current_time()
        with trio.fail_after(60):
            assert await raw.closed(within=60)
        assert trio.current_time() - started == pytest.approx(Limits().handshake_timeout, abs=1)


async def test_a_handshake_whose_replies_are_not_read_is_dropped_at_its_deadline(
    autojump_clock: object,
) -> None:
    """Options sent, their replies never read: the replies being written do not outlast
    the handshake's deadline (the send timeout is longer)."""
    limits = Limits()
    assert limits.send_timeout > limits.handshake_timeout
    server = NBDServer(ServeBackend([mem_export()]), limits=limits)
    client_end, server_end = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def serve() -> None:
            await server.handle_stream(server_end)
            done.set()

        nursery.start_soon(serve)
        started = trio.current_time()
        await RawClient(client_end).greet()
        await client_end.send_all(option(c.Opt.LIST) * 64)  # and never read the replies
        with trio.fail_after(120):
            await done.wait()
        assert trio.current_time() - started == pytest.approx(limits.handshake_timeout, abs=1)


async def test_a_client_that_reads_nothing_is_dropped(autojump_clock: object) -> None:
    server = NBDServer(ServeBackend([mem_export()]), limits=Limits(send_timeout=30))
    client_end, server_end = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def serve() -> None:
            await server.handle_stream(server_end)
            done.set()

        nursery.start_soon(serve)
        raw = RawClient(client_end)
        await raw.go()
        nursery.start_soon(raw.send, request(c.Cmd.READ, 0, 1 << 20))  # and never read it
        started = trio.current_time()
        with trio.fail_after(120):
            await done.wait()
        assert 30 <= trio.current_time() - started < 40
        nursery.cancel_scope.cancel()


async def test_refusals_a_client_does_not_read_are_held_to_the_request_bound(
    autojump_clock: object,
) -> None:
    """A client floods requests the server refuses (zero-length READs) behind a reply it
    does not read: the server stops reading from it once the refusals fill its slots."""
    limits = Limits(requests=4)
    server = NBDServer(ServeBackend([mem_export()]), limits=limits)
    client_end, server_end = trio.testing.lockstep_stream_pair()
    sent = 0

    async def flood() -> None:
        nonlocal sent
        await client_end.send_all(request(c.Cmd.READ, 0, MiB))  # its reply is never read
        for cookie in range(1000):
            await client_end.send_all(request(c.Cmd.READ, 0, 0, cookie=cookie))
            sent += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, server_end)
        await RawClient(client_end).go()
        with trio.move_on_after(limits.send_timeout / 2):
            await flood()
        assert sent <= limits.requests
        await client_end.aclose()


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickled"])
async def test_a_write_payload_not_whole_within_the_timeout_is_dropped(
    autojump_clock: object, trickle: bool
) -> None:
    """A WRITE's header, then its payload a byte now and then or not at all: the
    connection is dropped once the payload is late, and its budget given back."""
    limits = Limits(payload_timeout=30)
    server = NBDServer(ServeBackend([mem_export()]), limits=limits)
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, server_end)
        raw = RawClient(client_end)
        await raw.go()
        await raw.send(request(c.Cmd.WRITE, 0, MiB) + b"x")
        started = trio.current_time()
        with trio.fail_after(120):
            while trickle and not await raw.closed(within=7):  # never just at the deadline
                await raw.send(b"x")
            assert await raw.closed(within=120)
        assert trio.current_time() - started == pytest.approx(limits.payload_timeout, abs=5)
        assert server._budget.held == 0  # type: ignore[attr-defined]


async def test_a_client_gone_mid_write_harms_nobody(nursery: trio.Nursery, short_tmp: Path) -> None:
    export = mem_export()
    async with serving([export], short_tmp) as s:
        good = await s.client(nursery)
        async with await RawClient.connect(str(s.address.path)) as bad:
            await bad.go()
            await bad.send(request(c.Cmd.WRITE, 0, 65536) + b"h" * 30000)
        await wait_until(lambda: s.serving.server.connections == 1)
        assert bytes(await export.bytes.read(0, 8)) == bytes(8)  # nothing half-written
        await good.pwrite(memoryview(b"ok"), 0)
        await good.aclose()


async def test_connections_beyond_the_limit_are_closed_at_once(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    async with serving([mem_export()], short_tmp, limits=Limits(connections=2)) as s:
        a, b = await s.client(nursery), await s.client(nursery)
        with pytest.raises(ConnectionLost):
            await s.client(nursery)
        await a.aclose()
        await wait_until(lambda: s.serving.server.connections == 1)
        c3 = await s.client(nursery)
        await c3.aclose()
        await b.aclose()


async def test_unknown_client_flags_close_the_connection(short_tmp: Path) -> None:
    async with serving([mem_export()], short_tmp) as s:
        async with await RawClient.connect(str(s.address.path)) as raw:
            await raw.greet(flags=0x7)  # bit 2 was never offered
            assert await raw.closed()
        async with await RawClient.connect(str(s.address.path)) as raw:
            await raw.go()  # the server is still there


async def test_huge_option_lengths_are_skipped_and_the_stream_stays_in_sync(
    short_tmp: Path,
) -> None:
    async with serving([mem_export()], short_tmp) as s:
        async with await RawClient.connect(str(s.address.path)) as raw:
            await raw.greet()
            await raw.send(option(99, length=2 * MiB))
            for _ in range(32):
                await raw.send(bytes(MiB // 16))
            assert [r.rtype for r in await raw.ask(b"")] == [c.Rep.ERR_UNSUP]
            await raw.send(option(c.Opt.INFO, length=MiB) + bytes(MiB))
            assert [r.rtype for r in await raw.ask(b"")] == [c.Rep.ERR_TOO_BIG]
            replies = await raw.ask(option(c.Opt.GO, info_data("disk")))
            assert replies[-1].rtype == c.Rep.ACK
        async with await RawClient.connect(str(s.address.path)) as raw:
            await raw.greet()
            await raw.send(option(c.Opt.EXPORT_NAME, length=0xFFFFFFFF))
            await raw.send(bytes(MiB))  # the server reads it, holds none of it
            await raw.stream.aclose()


async def test_a_flood_of_writes_is_held_back_by_the_bounds(short_tmp: Path) -> None:
    """A client that sends writes without end to a device that does not answer: the
    server holds a bounded number of payloads, and TCP holds back the rest."""
    gate = Gate(MemoryDevice(64 * MiB), range(0, 1 << 20), writes=True)
    limits = Limits(connection_bytes=4 * MiB, server_bytes=6 * MiB)
    async with serving([export_of(gate)], short_tmp, limits=limits) as s:
        server = s.serving.server
        floods = [await RawClient.connect(str(s.address.path)) for _ in range(3)]

        async def flood(raw: RawClient, base: int) -> None:
            await raw.go()
            for i in range(64):
                offset = base + i * MiB
                await raw.stream.send_all(request(c.Cmd.WRITE, offset, MiB) + bytes(MiB))

        async with trio.open_nursery() as nursery:
            for n, raw in enumerate(floods):
                nursery.start_soon(flood, raw, n * 16 * MiB)
            await gate.entered.wait()
            await trio.testing.wait_all_tasks_blocked(0.05)  # the floods filled what they may
            held = server._budget.held  # type: ignore[attr-defined]
            assert 0 < held <= limits.server_bytes + MiB
            nursery.cancel_scope.cancel()
        for raw in floods:
            await raw.stream.aclose()
        gate.release.set()
        await wait_until(lambda: server.connections == 0)
        assert server._budget.held == 0  # type: ignore[attr-defined]


async def test_random_garbage_never_takes_the_server_down(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    rng = random.Random(15)
    async with serving([mem_export()], short_tmp) as s:
        good = await s.client(nursery)
        for round_ in range(30):
            async with await RawClient.connect(str(s.address.path)) as raw:
                if round_ % 2:
                    await raw.go()
                pieces = [rng.randbytes(rng.randrange(1, 200)) for _ in range(rng.randrange(1, 6))]
                if round_ % 3 == 0:  # something that looks like a request first
                    pieces.insert(0, request(rng.randrange(12), rng.randrange(1 << 20), 512))
                try:
                    for piece in pieces:
                        await raw.send(piece)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            await good.pwrite(memoryview(b"%d" % round_), 0)
        await wait_until(lambda: s.serving.server.connections == 1)
        await good.aclose()
