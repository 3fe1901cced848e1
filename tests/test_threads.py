"""WorkerThreads: blocking calls in worker threads, without trio.to_thread's cost."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest
import trio

from blockfuse.threads import WorkerThreads


async def test_a_call_returns_its_value_from_another_thread() -> None:
    threads = WorkerThreads(2, "test")
    with trio.fail_after(10):
        name = await threads.run(lambda: threading.current_thread().name)
    assert name.startswith("test") and name != threading.current_thread().name


async def test_a_call_raises_what_the_function_raised() -> None:
    def fails(message: str) -> None:
        raise OSError(5, message)

    with trio.fail_after(10), pytest.raises(OSError, match="disk on fire"):
        await WorkerThreads(1, "test").run(fails, "disk on fire")


async def test_no_more_calls_run_at_once_than_the_limit() -> None:
    threads, lock = WorkerThreads(3, "test"), threading.Lock()
    running, most = 0, 0

    def busy() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(threads.run, busy)
    assert most == 3


async def test_calls_beyond_the_limit_wait_their_turn_and_all_run() -> None:
    """A queued call is taken by the next thread that frees up (first come, first run)."""
    threads, release, order = WorkerThreads(1, "test"), threading.Event(), []

    def first() -> None:
        release.wait(10)
        order.append("first")

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(threads.run, first)
            await trio.sleep(0.05)
            for i in range(5):
                nursery.start_soon(threads.run, order.append, i)
                await trio.sleep(0.01)
            release.set()
    assert order == ["first", 0, 1, 2, 3, 4]


async def test_a_cancel_waits_for_the_call_to_end() -> None:
    """A blocking call cannot be abandoned (its buffer, its descriptor): a cancelled
    caller gets the call's value once it has returned, and the cancel at its next
    checkpoint (as trio.to_thread.run_sync does by default)."""
    threads, started, events = WorkerThreads(1, "test"), threading.Event(), []

    def slow() -> str:
        started.set()
        time.sleep(0.2)
        events.append("done")
        return "value"

    async def caller() -> None:
        events.append(await threads.run(slow))
        await trio.lowlevel.checkpoint()
        events.append("not cancelled")

    with trio.fail_after(10):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(caller)
                await trio.to_thread.run_sync(started.wait)
                scope.cancel()
        assert scope.cancelled_caught
    assert events == ["done", "value"]


async def test_an_already_cancelled_caller_runs_nothing() -> None:
    ran = []
    with trio.CancelScope() as scope:
        scope.cancel()
        await WorkerThreads(1, "test").run(ran.append, 1)
    assert ran == [] and scope.cancelled_caught


def test_one_pool_serves_one_trio_run_after_another() -> None:
    """Each call answers through its own caller's event loop."""
    threads = WorkerThreads(2, "test")

    async def one(n: int) -> int:
        with trio.fail_after(10):
            return await threads.run(lambda: n * 2)

    assert [trio.run(one, n) for n in range(3)] == [0, 2, 4]


async def test_idle_threads_end_and_new_ones_start_when_needed() -> None:
    threads = WorkerThreads(2, "test", idle_seconds=0.05)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(threads.run, time.sleep, 0.02)
        assert threads.alive == 2
        await trio.to_thread.run_sync(wait_until, lambda: threads.alive == 0)
        assert await threads.run(lambda: 7) == 7


def wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        time.sleep(0.01)


async def test_a_pool_that_cannot_start_a_thread_fails_the_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a caller waiting forever for a thread that never came."""
    threads = WorkerThreads(2, "test")

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with trio.fail_after(10):
        with monkeypatch.context() as patch:
            patch.setattr(threading.Thread, "start", refuse)
            with pytest.raises(OSError, match="cannot start a test thread"):
                await threads.run(lambda: 1)
        assert threads.alive == 0
        assert await threads.run(lambda: 2) == 2


def test_a_forked_child_gets_threads_of_its_own() -> None:
    """The parent's threads do not exist in a child: a call there must not wait for one."""
    threads = WorkerThreads(1, "test")
    assert trio.run(threads.run, lambda: 1) == 1 and threads.alive == 1
    pid = os.fork()
    if pid == 0:  # the child: answer through the exit status, never return into pytest
        try:
            code = trio.run(_call_with_deadline, threads)
        except BaseException:
            code = 99
        os._exit(code)
    deadline = time.monotonic() + 10
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's call never ran")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(done[1]) == 42


async def _call_with_deadline(threads: WorkerThreads) -> int:
    with trio.fail_after(5):
        return await threads.run(lambda: 42)


async def test_a_call_cancelled_while_still_queued_runs_nothing_and_ends_at_once() -> None:
    """Queued behind a busy pool, nothing of a call has run yet: its cancelled caller
    leaves at once, as a wait for a ``CapacityLimiter`` token in ``trio.to_thread`` did,
    not when the call ahead of it (a stalled device's) returns."""
    threads, started, release = WorkerThreads(1, "test"), threading.Event(), threading.Event()
    ran: list[str] = []

    def stalled() -> None:
        started.set()
        release.wait(2)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(threads.run, stalled)
            await trio.to_thread.run_sync(started.wait)
            with trio.move_on_after(0.05) as scope:
                await threads.run(ran.append, "queued")
            still_stalled = not release.is_set()
            release.set()
        assert await threads.run(lambda: 3) == 3
    assert ran == []
    assert still_stalled and scope.cancelled_caught


def test_calls_of_two_loops_both_fail_when_no_thread_can_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two event loops' calls queued at once, each starting a thread that cannot start:
    neither caller waits forever for a thread that will never come."""
    threads, both = WorkerThreads(2, "test"), threading.Barrier(2, timeout=5)
    start = threading.Thread.start

    def refuse(self: threading.Thread) -> None:
        if not self.name.startswith("test-"):
            return start(self)
        both.wait()  # both calls queued, each caller counted a thread of its own
        raise RuntimeError("can't start new thread")

    results: dict[str, str] = {}

    def loop(name: str) -> None:
        try:
            results[name] = trio.run(threads.run, lambda: "ran")
        except OSError as exc:
            results[name] = "failed" if "cannot start" in str(exc) else repr(exc)

    monkeypatch.setattr(threading.Thread, "start", refuse)
    loops = [threading.Thread(target=loop, args=(n,), name=n, daemon=True) for n in "ab"]
    for t in loops:
        t.start()
    for t in loops:
        t.join(10)
    monkeypatch.undo()
    assert results == {"a": "failed", "b": "failed"} and threads.alive == 0
