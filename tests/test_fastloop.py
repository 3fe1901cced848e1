"""The FUSE worker loop's fast wait (``blockfuse.fuse.fastloop``), against a stand-in for
pyfuse3's: a socket plays /dev/fuse, one byte per request, and the workers read it the
way pyfuse3's loop does, right after the wait says readable, without yielding."""

from __future__ import annotations

import os
import socket

import trio
import trio.testing

from blockfuse.fuse.fastloop import SLOW_EVERY, FastWait


class StockWait:
    """pyfuse3 3.5's ``_wait_fuse_readable``: one waiter at a time, then wait_readable."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = trio.Lock()
        self.closed = False

    async def __call__(self) -> bool:
        async with self.lock:
            if self.closed:
                return False
            await trio.lowlevel.wait_readable(self.fd)
            return True


async def serve(wait: FastWait, fd: int, stalls: list[int], served: list[int]) -> None:
    """One worker: wait, then read one request at once, as pyfuse3's loop does."""
    while await wait():
        try:
            served.append(os.read(fd, 1)[0])  # non-blocking: an empty read would raise
        except BlockingIOError:
            stalls.append(1)  # pyfuse3's blocking read would have stalled the loop here
        await trio.lowlevel.checkpoint()  # the handler


async def test_many_workers_racing_single_requests_never_read_an_empty_fd() -> None:
    ours, kernel = socket.socketpair()
    ours.setblocking(False)
    stock = StockWait(ours.fileno())
    wait = FastWait(ours.fileno(), stock)
    stalls: list[int] = []
    served: list[int] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(serve, wait, ours.fileno(), stalls, served)
            for n in range(2000):
                kernel.send(bytes([n % 256]))  # one request at a time, or a few
                if n % 3:
                    await trio.testing.wait_all_tasks_blocked()
            await trio.testing.wait_all_tasks_blocked()  # every request served
            stock.closed = True
            kernel.close()
            nursery.cancel_scope.cancel()
    ours.close()
    assert not stalls and len(served) == 2000
    assert wait.fast > 0, "queued requests were read without waiting"


async def test_a_worker_kept_busy_still_lets_others_run() -> None:
    """With requests always queued, every SLOW_EVERY-th call takes the real wait, which
    yields: another task makes progress."""
    ours, kernel = socket.socketpair()
    ours.setblocking(False)
    kernel.send(bytes(4096))  # a backlog that never runs out during the test
    wait = FastWait(ours.fileno(), StockWait(ours.fileno()))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            for _ in range(10 * SLOW_EVERY):
                assert await wait()
                os.read(ours.fileno(), 1)
            nursery.cancel_scope.cancel()
    ours.close()
    kernel.close()
    assert ticks >= 5


class SignalledWait:
    """A stand-in for the stock wait that says "readable" when the test sets its event,
    whatever the fd holds: the moment a readiness wakeup races another reader."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.closed = False

    async def __call__(self) -> bool:
        await self.event.wait()
        self.event = trio.Event()
        return not self.closed


async def test_a_request_taken_by_a_fast_reader_is_not_read_again_after_a_wait() -> None:
    """Worker A waits (the slow way); the request it was woken for is taken first by a
    worker on the fast path.  A must look again instead of reading an empty fd."""
    ours, kernel = socket.socketpair()
    ours.setblocking(False)
    stock = SignalledWait()
    wait = FastWait(ours.fileno(), stock)
    stalls: list[int] = []
    served: list[int] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, wait, ours.fileno(), stalls, served)  # worker A
            await trio.testing.wait_all_tasks_blocked()
            kernel.send(b"x")
            stock.event.set()  # A is woken for it...
            assert await wait()  # ...but worker B, on the fast path, runs first
            served.append(os.read(ours.fileno(), 1)[0])
            await trio.testing.wait_all_tasks_blocked()
            stock.closed = True
            stock.event.set()
    ours.close()
    kernel.close()
    assert served == [ord("x")] and not stalls
