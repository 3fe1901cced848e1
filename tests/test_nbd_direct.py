"""A request alone on the connection is read by its own caller (transport/receiver.py):
what it reads, the hand-over to the reader task when others come meanwhile, a caller
cancelled mid-reply, a server that stalls or breaks the protocol mid-reply.

The peer is a server made of the sans-io core whose every reply waits a time the test
chooses (so replies come in any order), over memory streams (on the autojump clock) or
a socket pair (the socket path, with its lean header read; on the real clock); then
nbdkit, the real thing.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from blockfuse.errors import Disconnected, ProtocolError
from blockfuse.nbd import constants as c
from blockfuse.nbd.events import ClientGone, ExportInfo, ReadReply, Reply, Request
from blockfuse.nbd.server import ServerCore
from blockfuse.nbd.uri import parse_uri
from blockfuse.transport.client import CLOSE_TIMEOUT, NBDClient
from blockfuse.transport.connect import open_nbd_client, wrap_nbd_stream
from blockfuse.transport.handshake import ConnectionLost, Stalled
from blockfuse.transport.receiver import Turn

from .conftest import Start
from .hostile_nbd import Hostile, HostileProcess, Script, Stall
from .nbdpair import FULL_FLAGS, answer, drain

BLOCK = 4096
SIZE = 1 << 20


class Timed:
    """An NBD server whose replies each wait ``delay(request)`` seconds, in a task of
    their own; ``split_next`` sends the next READ's reply up to its half, then waits for
    ``resume``; ``garbage_next`` answers the next request with bytes no reply begins
    with; ``error_next`` fails the next request with that errno."""

    def __init__(self, *, structured: bool = True) -> None:
        self.disk = bytearray(os.urandom(SIZE))
        self.export = ExportInfo("disk", SIZE, FULL_FLAGS, "timed")
        self.structured = structured
        self.delay: Callable[[Request], float] = lambda req: 0.0
        self.split_next = False
        self.resume = trio.Event()
        self.garbage_next = False
        self.error_next = 0
        self.requests = 0
        self.disconnects = 0
        self.closed = trio.Event()
        """The client closed the connection (EOF seen)."""

    async def handle(self, stream: trio.abc.Stream) -> None:
        core = ServerCore([self.export], structured=self.structured)
        lock = trio.Lock()
        async with stream, trio.open_nursery() as answers:
            await stream.send_all(core.data_to_send())
            while data := await receive(stream):
                core.receive_data(data)
                events = drain(core)
                for event in events:
                    if isinstance(event, Request):
                        self.requests += 1
                        answers.start_soon(self._answer, stream, core, lock, event)
                if out := core.data_to_send():
                    await stream.send_all(out)
                if any(isinstance(e, ClientGone) for e in events):
                    self.disconnects += 1
                    break
            self.closed.set()
            answers.cancel_scope.cancel()

    async def _answer(
        self, stream: trio.abc.Stream, core: ServerCore, lock: trio.Lock, req: Request
    ) -> None:
        await trio.sleep(self.delay(req))
        async with lock:
            if self.garbage_next:
                self.garbage_next = False
                await stream.send_all(b"\xde\xad\xbe\xef" * 8)
                return
            out = self._reply(core, req)
            if self.split_next and req.cmd == c.Cmd.READ:
                self.split_next = False
                half = len(out) - req.length // 2
                await stream.send_all(out[:half])
                await self.resume.wait()
                out = out[half:]
            await stream.send_all(out)

    def _reply(self, core: ServerCore, req: Request) -> bytes:
        """The reply's bytes: one data chunk for a READ (the lone caller's lean path)."""
        if self.error_next:
            error, self.error_next = self.error_next, 0
            return b"".join(core.send(Reply(req.cookie, error, "told to")))
        if req.cmd == c.Cmd.READ:
            data = bytes(self.disk[req.offset : req.end])
            return b"".join(core.send(ReadReply(req.cookie, req.offset, (data,))))
        return answer(core, self.disk, req)


async def receive(stream: trio.abc.Stream) -> bytes:
    try:
        return bytes(await stream.receive_some(1 << 16))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return b""


def stream_pair(kind: str) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    if kind == "memory":
        return trio.testing.memory_stream_pair()
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def connect(
    nursery: trio.Nursery, server: Timed | Hostile, kind: str = "memory", **kw: float
) -> NBDClient:
    client_end, server_end = stream_pair(kind)
    nursery.start_soon(server.handle, server_end)
    with trio.fail_after(10):
        client = await wrap_nbd_stream(nursery, client_end, "disk", server="timed", **kw)  # type: ignore[arg-type]
        await parked(client)
    return client


async def parked(client: NBDClient) -> None:
    """Until nobody reads the connection (the reader task has parked); polled, as the
    turn has no event of its own."""
    while client._receiver.turn is not Turn.PARKED:  # noqa: ASYNC110
        await trio.sleep(0.001)


KINDS = pytest.mark.parametrize("kind", ["memory", "socket"])


@KINDS
@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
async def test_lone_requests_are_read_by_their_callers(
    nursery: trio.Nursery, kind: str, structured: bool
) -> None:
    server = Timed(structured=structured)
    client = await connect(nursery, server, kind)
    data = os.urandom(3 * BLOCK)
    with trio.fail_after(10):
        await client.pwrite(memoryview(data), BLOCK)
        await client.flush()
        buf = bytearray(5 * BLOCK)  # 5 blocks: with structured replies, 5 chunks
        await client.pread(memoryview(buf), 0)
        await client.zero(BLOCK, BLOCK)
        await client.trim(2 * BLOCK, BLOCK)
        one = bytearray(BLOCK)
        await client.pread(memoryview(one), 3 * BLOCK)
        if structured:
            assert await client.block_status(0, BLOCK) == [(BLOCK, 0)]
    assert buf == server.disk[:BLOCK] + data + server.disk[4 * BLOCK : 5 * BLOCK]
    assert one == data[2 * BLOCK :] and server.disk[BLOCK : 3 * BLOCK] == bytes(2 * BLOCK)
    stats = client.statistics()
    assert (stats.alone, stats.by_reader, stats.handovers) == (6 + structured, 0, 0)
    await client.aclose()


@KINDS
@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
async def test_a_reply_that_comes_before_the_lone_one_is_delivered_by_its_reader(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, kind: str, structured: bool
) -> None:
    """The first read, read by its caller, is answered last: that caller delivers the
    second request's reply on its way (over a socket its first read takes the other
    reply's header, and its data into the wrong buffer, from where it goes through the
    core), and nothing is handed over."""
    server = Timed(structured=structured)
    server.delay = lambda req: 2.0 if req.offset == 0 else 0.0
    client = await connect(nursery, server, kind)
    first, second = bytearray(BLOCK), bytearray(BLOCK)
    async with trio.open_nursery() as both:
        both.start_soon(client.pread, memoryview(first), 0)
        await trio.sleep(1)
        both.start_soon(client.pread, memoryview(second), BLOCK)
    assert first + second == server.disk[: 2 * BLOCK]
    stats = client.statistics()
    assert (stats.alone, stats.by_reader, stats.handovers) == (1, 0, 0)


@KINDS
async def test_a_request_sent_while_a_caller_reads_is_answered_after_the_hand_over(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, kind: str
) -> None:
    """The second request comes while the first caller reads its own reply, and is
    answered after it: the first caller hands the connection to the reader task."""
    server = Timed()
    server.delay = lambda req: 2.0 if req.offset == 0 else 5.0
    client = await connect(nursery, server, kind)
    first, second = bytearray(BLOCK), bytearray(BLOCK)
    async with trio.open_nursery() as both:
        both.start_soon(client.pread, memoryview(first), 0)
        await trio.sleep(1)
        both.start_soon(client.pread, memoryview(second), BLOCK)
    assert first + second == server.disk[: 2 * BLOCK]
    stats = client.statistics()
    assert (stats.alone, stats.by_reader, stats.handovers) == (1, 1, 1)
    await parked(client)  # then alone again
    await client.pread(memoryview(first), 2 * BLOCK)
    assert client.statistics().alone == 2


async def mixed_load(client: NBDClient, tasks: int, ops: int, pause: float, seed: int) -> None:
    """``tasks`` tasks, each on blocks of its own, writing and reading them back (and
    flushing) with pauses of up to ``pause`` seconds: requests alone and side by side."""

    async def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        mine = {b: b"" for b in range(i * 8, i * 8 + 8)}
        for _ in range(ops):
            block = rng.choice(list(mine))
            op = rng.random()
            if op < 0.4 or not mine[block]:
                count = rng.choice([1, 1, 2]) if block + 1 in mine else 1
                blob = rng.randbytes(BLOCK * count)
                await client.pwrite(memoryview(blob), block * BLOCK)
                for k in range(count):
                    mine[block + k] = blob[k * BLOCK : (k + 1) * BLOCK]
            elif op < 0.9:
                buf = bytearray(BLOCK)
                await client.pread(memoryview(buf), block * BLOCK)
                assert buf == mine[block], (i, block)
            else:
                await client.flush()
            await trio.sleep(rng.random() * pause if rng.random() < 0.7 else 0)

    async with trio.open_nursery() as workers:
        for i in range(tasks):
            workers.start_soon(worker, i)


async def test_the_hand_over_race_on_the_autojump_clock(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """Replies in any order (each waits 0-3 ms), tasks that come alone and together:
    every read sees what its task wrote last, and the connection keeps working."""
    rng = random.Random(7)
    server = Timed()
    server.delay = lambda req: rng.choice([0, 0, 0.001, 0.002, 0.003])
    client = await connect(nursery, server)
    await mixed_load(client, tasks=6, ops=150, pause=0.03, seed=1)
    stats = client.statistics()
    assert stats.alone > 50 and stats.by_reader > 50 and stats.handovers > 10, stats
    assert client.broken is None
    await client.aclose()
    assert server.disconnects == 1


async def test_the_hand_over_race_over_a_socket(nursery: trio.Nursery) -> None:
    """The same over a socket pair, where a lone caller reads the header alone and the
    data straight into its buffer; real time, so scheduling varies too."""
    rng = random.Random(8)
    server = Timed()
    server.delay = lambda req: rng.choice([0, 0, 0, 0.0005, 0.001])
    client = await connect(nursery, server, "socket")
    with trio.fail_after(60):
        await mixed_load(client, tasks=6, ops=100, pause=0.01, seed=2)
    stats = client.statistics()
    assert stats.alone > 3 and stats.by_reader > 3, stats  # real time: counts vary
    assert client.broken is None
    await client.aclose()


@KINDS
async def test_a_caller_cancelled_mid_reply_leaves_the_stream_in_step(
    nursery: trio.Nursery, kind: str
) -> None:
    """Half of the reply has come when the caller is cancelled: the reader task reads
    the rest (into the buffer nobody reads any more), and the next request is answered
    on the same connection."""
    server = Timed()
    server.split_next = True
    client = await connect(nursery, server, kind)
    buf = bytearray(BLOCK)
    with trio.move_on_after(0.2) as scope:
        await client.pread(memoryview(buf), 0)
    assert scope.cancelled_caught
    assert client.statistics().handovers == 1 and client._receiver.turn is Turn.READER
    server.resume.set()
    second = bytearray(BLOCK)
    with trio.fail_after(10):
        await client.pread(memoryview(second), BLOCK)
        await parked(client)
        await client.pread(memoryview(second), BLOCK)
    assert second == server.disk[BLOCK : 2 * BLOCK]
    assert buf == server.disk[:BLOCK]  # the late data, where the call said
    assert client.broken is None and client.statistics().alone == 1  # the cancelled one not
    await client.aclose()


@KINDS
async def test_a_caller_cancelled_while_another_reply_comes_loses_nothing(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, kind: str
) -> None:
    """A lone caller is cancelled while a second request (sent meanwhile) is answered
    half: the reader task takes over mid-reply, and the second caller gets its data."""
    server = Timed()
    server.delay = lambda req: 1000.0 if req.offset == 0 else 2.0
    server.split_next = True
    client = await connect(nursery, server, kind)
    second = bytearray(BLOCK)

    async def second_read() -> None:
        await trio.sleep(1)
        await client.pread(memoryview(second), BLOCK)

    with trio.fail_after(20):
        async with trio.open_nursery() as both:
            both.start_soon(second_read)
            with trio.move_on_after(10) as scope:
                await client.pread(memoryview(bytearray(BLOCK)), 0)
            assert scope.cancelled_caught and len(both.child_tasks) == 1
            assert client._receiver.turn is Turn.READER
            server.resume.set()
    assert second == server.disk[BLOCK : 2 * BLOCK]
    assert client.statistics().handovers == 1 and client.broken is None


@KINDS
async def test_closing_under_a_lone_read_fails_it_as_closed(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, kind: str
) -> None:
    """``aclose`` while a lone caller waits for a reply that never comes: after
    ``CLOSE_TIMEOUT`` the read fails with ``Disconnected``, not as a lost connection."""
    server = Timed()
    server.delay = lambda req: 1000.0
    client = await connect(nursery, server, kind)
    failed: list[BaseException] = []

    async def read() -> None:
        try:
            await client.pread(memoryview(bytearray(BLOCK)), 0)
        except Disconnected as exc:
            failed.append(exc)

    async with trio.open_nursery() as both:
        both.start_soon(read)
        await trio.sleep(1)
        started = trio.current_time()
        await client.aclose()
        assert trio.current_time() - started == pytest.approx(CLOSE_TIMEOUT, abs=0.5)
    assert len(failed) == 1 and client.statistics().alone == 1


async def test_a_caller_cancelled_before_any_reply_is_then_timed_by_the_reader(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A request whose caller gave up, never answered: the reader drops the connection
    at the request's deadline, as it would for any request it reads."""
    server = Timed()
    server.delay = lambda req: 1000.0
    client = await connect(nursery, server)
    started = trio.current_time()
    with trio.move_on_after(1):
        await client.pread(memoryview(bytearray(BLOCK)), 0)
    with trio.fail_after(100):
        await client._reader_done.wait()
    assert isinstance(client.broken, Stalled)
    assert trio.current_time() - started == pytest.approx(30, abs=1)
    await server.closed.wait()


async def test_a_server_stalling_mid_reply_fails_a_lone_read_at_its_deadline(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    hostile = Hostile(Script(stall=Stall.DURING))
    client = await connect(nursery, hostile)
    started = trio.current_time()
    with trio.fail_after(100), pytest.raises(Stalled) as info:
        await client.pread(memoryview(bytearray(BLOCK)), 0)
    assert info.value.errno == errno.ETIMEDOUT
    assert trio.current_time() - started == pytest.approx(30, abs=1)
    assert client.broken is info.value and client.statistics().alone == 1
    with trio.fail_after(10):
        await client._reader_done.wait()  # the socket is closed
    hostile.release.set()


def test_a_server_process_stalling_mid_reply_fails_a_lone_read_in_time(short_tmp: Path) -> None:
    """Over a real socket (the lean path), with a 1 s timeout."""
    with HostileProcess(short_tmp, {"stall": "during"}) as server:

        async def main() -> tuple[BaseException, float, int]:
            address = parse_uri(server.uri())
            async with open_nbd_client(address, request_timeout=1) as client:
                await parked(client)
                started = trio.current_time()
                try:
                    await client.pread(memoryview(bytearray(BLOCK)), 0)
                except Stalled as exc:
                    return exc, trio.current_time() - started, client.statistics().alone
            raise AssertionError("the read succeeded")

        error, took, alone = trio.run(main)
    assert isinstance(error, Stalled) and 1 <= took < 3 and alone == 1, (error, took)


async def test_a_protocol_violation_in_a_lone_reply_drops_the_connection_at_once(
    nursery: trio.Nursery,
) -> None:
    server = Timed()
    server.garbage_next = True
    client = await connect(nursery, server, "socket")
    with trio.fail_after(10), pytest.raises(ProtocolError, match="unknown magic 0xdeadbeef"):
        await client.pread(memoryview(bytearray(BLOCK)), 0)
    assert isinstance(client.broken, ProtocolError)
    with trio.fail_after(10):
        await server.closed.wait()  # a hard disconnect, not at the next request or close
    with pytest.raises(ProtocolError):
        await client.flush()


@KINDS
async def test_eshutdown_to_a_lone_request_sends_disc(nursery: trio.Nursery, kind: str) -> None:
    server = Timed()
    server.error_next = errno.ESHUTDOWN
    client = await connect(nursery, server, kind)
    with trio.fail_after(10), pytest.raises(ConnectionLost, match="shutting down"):
        await client.pread(memoryview(bytearray(BLOCK)), 0)
    with trio.fail_after(10):
        await server.closed.wait()
    assert server.disconnects == 1  # a soft disconnect: NBD_CMD_DISC
    await client.aclose()


# --- nbdkit -----------------------------------------------------------------------------


@pytest.mark.interop
@pytest.mark.parametrize("extra", [[], ["--no-sr"]], ids=["structured", "simple"])
async def test_depth_1_against_nbdkit(start: Start, extra: list[str]) -> None:
    peer = start(["nbdkit", "-f", "-U", "{sock}", *extra, "memory", "16M"])
    oracle = bytearray(16 << 20)
    rng = random.Random(3)
    async with open_nbd_client(parse_uri(peer.uri())) as client:
        await parked(client)
        with trio.fail_after(60):
            for _ in range(300):
                offset = rng.randrange((16 << 20) // BLOCK - 64) * BLOCK
                n = rng.choice([BLOCK, BLOCK, 8 * BLOCK, 64 * BLOCK])
                op = rng.random()
                if op < 0.4:
                    blob = rng.randbytes(n)
                    await client.pwrite(memoryview(blob), offset)
                    oracle[offset : offset + n] = blob
                elif op < 0.9:
                    buf = bytearray(n)
                    await client.pread(memoryview(buf), offset)
                    assert buf == oracle[offset : offset + n]
                elif op < 0.95:
                    await client.flush()
                else:
                    await client.zero(offset, n)
                    oracle[offset : offset + n] = bytes(n)
        stats = client.statistics()
        assert (stats.alone, stats.by_reader, stats.handovers) == (300, 0, 0)


@pytest.mark.interop
async def test_mixed_depths_against_nbdkit_with_delays(start: Start) -> None:
    peer = start(
        ["nbdkit", "-f", "-U", "{sock}", "--filter=delay", "memory", "16M",
         "delay-read=1ms", "delay-write=2ms"]
    )  # fmt: skip
    async with open_nbd_client(parse_uri(peer.uri())) as client:
        with trio.fail_after(120):
            await mixed_load(client, tasks=6, ops=60, pause=0.004, seed=4)
        stats = client.statistics()
        assert stats.alone > 3 and stats.by_reader > 3, stats  # real time: counts vary
        assert client.broken is None
