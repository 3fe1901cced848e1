"""Worker threads for blocking calls, at less than half the cost of ``trio.to_thread``.

Devices hand blocking calls to threads: reads that miss the page cache, writes that
writeback throttles, flushes, and the copier's chunks.  ``trio.to_thread.run_sync``
costs far more than the call itself here: on the 2-core dev VM a call of a function
that does nothing took 315 µs (280 µs of CPU) one at a time and 152 µs (166 µs of CPU)
with 16 in flight, because each call wakes a cached thread, sets it up for calls back
into trio and wakes the loop again.  A random 4 KiB read of a file whose pages were not
cached went that way, and fio through the mount read such a file at 5.5-6k IOPS at
depth 16, where one Python thread calling ``preadv`` read 14-17k per second.

``WorkerThreads`` does the least a hand-off needs.  A call is queued, with its task and
its event loop's token; a thread takes it, runs it and reschedules the task through that
token.  A thread that finishes a call takes the next one queued at once, without a round
trip through the event loop, so calls queued behind a busy pool cost no extra wake-up.
The same calls: 139 µs (131 µs of CPU) one at a time, 54 µs (58 µs) with 16 in flight.

- At most ``limit`` threads run; more calls wait in the queue, first come first run.
  Threads start when a call finds none idle, and end after ``idle_seconds`` without work.
- A call cannot be abandoned once a thread has taken it (it holds a buffer, a
  descriptor): a cancelled caller waits for it to return and is cancelled then, as
  ``trio.to_thread.run_sync`` does by default.  A call still queued has not begun: a
  cancel takes it out and its caller leaves at once (as a wait for ``trio.to_thread``'s
  limiter did), so calls stalled in every thread hold no one else's cancel.
- One pool serves any number of event loops, one after another or at once: each call
  carries its own loop's token.  A forked child starts with no threads and no calls
  (its parent's threads do not exist in it).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import itertools
import os
import resource
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

IDLE_SECONDS = 10.0
"""A thread with nothing to do for this long ends."""

_Call = tuple[Callable[..., Any], tuple[Any, ...], trio.lowlevel.Task, trio.lowlevel.TrioToken]


class WorkerThreads:
    """Up to ``limit`` threads that run blocking calls for trio tasks (module text)."""

    def __init__(self, limit: int, name: str, *, idle_seconds: float = IDLE_SECONDS) -> None:
        if limit < 1:
            raise ValueError(f"a pool needs at least one thread, not {limit}")
        self.limit = limit
        self.name = name
        self._idle_seconds = idle_seconds
        self._numbers = itertools.count(1)
        self._forget()
        _pools.add(self)

    def _forget(self) -> None:
        """No threads, no calls: a new pool, or one in a forked child."""
        self._queue: collections.deque[_Call] = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._idle = 0
        self.alive = 0
        """Threads alive now."""

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in one of the threads; its value, or what it raised."""
        await trio.lowlevel.checkpoint_if_cancelled()
        call = (fn, args, trio.lowlevel.current_task(), trio.lowlevel.current_trio_token())
        self._submit(call)
        withdraw = functools.partial(self._withdraw, call)
        return await trio.lowlevel.wait_task_rescheduled(withdraw)  # type: ignore[no-any-return]

    def _withdraw(self, call: _Call, _: Any) -> trio.lowlevel.Abort:
        """A cancel: the call leaves the queue if no thread has taken it yet."""
        with self._ready:
            if _take_out(self._queue, call):
                return trio.lowlevel.Abort.SUCCEEDED
        return trio.lowlevel.Abort.FAILED

    def _submit(self, call: _Call) -> None:
        with self._ready:
            self._queue.append(call)
            if self._idle >= len(self._queue):
                self._ready.notify()
                return
            if self.alive < self.limit:
                self.alive += 1
                start = True
            else:
                start = False  # a busy thread takes it when it is done
        if start:
            self._start_thread(call)

    def _start_thread(self, call: _Call) -> None:
        name = f"{self.name}-{next(self._numbers)}"
        try:
            threading.Thread(target=self._serve, name=name, daemon=True).start()
        except RuntimeError as exc:  # the system has no thread to give
            if self._not_started(call, exc):
                raise self._no_thread(exc) from exc

    def _not_started(self, call: _Call, exc: RuntimeError) -> bool:
        """A thread did not start.  If no other is alive or starting, every queued call
        fails: ``call`` through the return value (whether it was still queued), others
        (another loop's, queued at once) through their loops."""
        with self._ready:
            self.alive -= 1
            if self.alive:
                return False  # the calls wait for a thread that is alive, or starting
            stranded = list(self._queue)
            self._queue.clear()
        for other in stranded:
            if other is not call:
                _deliver(other, outcome.Error(self._no_thread(exc)))
        return any(queued is call for queued in stranded)

    def _no_thread(self, exc: RuntimeError) -> OSError:
        """What a call fails with when no thread could start for it (caused by ``exc``)."""
        error = OSError(errno.EAGAIN, f"cannot start a {self.name} thread: {exc}")
        error.__cause__ = exc
        return error

    def _serve(self) -> None:
        while (call := self._next_call()) is not None:
            _run(call)
            del call  # an idle thread keeps nothing of a call alive (its buffers)

    def _next_call(self) -> _Call | None:
        """The oldest queued call, once there is one; ``None`` once idle too long."""
        with self._ready:
            while not self._queue:
                self._idle += 1
                try:
                    woken = self._ready.wait(self._idle_seconds)
                finally:
                    self._idle -= 1
                if not woken and not self._queue:
                    self.alive -= 1
                    return None
            return self._queue.popleft()


_pools: weakref.WeakSet[WorkerThreads] = weakref.WeakSet()


def _forget_every_pool() -> None:
    for pool in _pools:
        pool._forget()


os.register_at_fork(after_in_child=_forget_every_pool)


def _run(call: _Call) -> None:
    fn, args, _, _ = call
    _deliver(call, outcome.capture(fn, *args))


def _deliver(call: _Call, result: outcome.Outcome[Any]) -> None:
    """Wake ``call``'s caller with ``result``, through its own event loop."""
    _, _, task, token = call
    with contextlib.suppress(trio.RunFinishedError):  # its caller still waits
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)


def _take_out(queue: collections.deque[_Call], call: _Call) -> bool:
    """Remove ``call`` itself (not an equal one) from ``queue``; whether it was there."""
    for i, queued in enumerate(queue):
        if queued is call:
            del queue[i]
            return True
    return False


SLOW_CALL = 0.001
"""A call in the event loop that took this long (seconds) and slept in the kernel
blocked: a device then sends its next calls to threads for a while."""


def thread_sleeps() -> int:
    """Voluntary context switches of this thread: how often it slept in the kernel (a
    call that took long and slept blocked; one that took long without, was preempted)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
