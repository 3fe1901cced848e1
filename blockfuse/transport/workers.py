"""The tasks that answer one connection's requests, each kept for the next request.

Spawning a trio task per request cost ~6 µs of CPU on the 2-core dev VM, waking a
parked one ~2.4 µs (a micro benchmark: 16 jobs a round, the loop passing between):
about a tenth of what the server spends on a 4 KiB request.  So a connection keeps
its tasks: a job handed over goes to a parked task if there is one, else to a new one,
up to ``limit``; past that it waits in the queue for the first task to come back::

    submit(job) -> queue -> an idle task woken (or a new one started) -> run(job)
                                                       done -> next job, or park

Invariant: a job in the queue is taken by a task that is running, woken or about to
start, since every task looks at the queue before it parks and ``submit`` wakes or
starts one unless ``limit`` tasks exist (each of them comes back to the queue).  The
tasks live in the connection's nursery: ``close`` ends them once the queue is empty;
cancelling the nursery ends them, parked or busy, and what was still queued is then
``unstarted`` (the connection gives back what it holds).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

Job = TypeVar("Job")


class Workers(Generic[Job]):
    """At most ``limit`` tasks in ``nursery`` running ``run(job)`` for each job."""

    def __init__(
        self, nursery: trio.Nursery, limit: int, run: Callable[[Job], Awaitable[None]]
    ) -> None:
        self._nursery = nursery
        self._limit = limit
        self._run = run
        self._queue: deque[Job] = deque()
        self._idle: list[trio.lowlevel.Task] = []
        self._tasks = 0
        self._closed = False

    def submit(self, job: Job) -> None:
        """Run ``job`` soon, in a task of the nursery (no checkpoint)."""
        self._queue.append(job)
        if self._idle:
            trio.lowlevel.reschedule(self._idle.pop())
        elif self._tasks < self._limit:
            self._tasks += 1
            self._nursery.start_soon(self._work)

    def close(self) -> None:
        """No more jobs: each task ends once the queue is empty."""
        self._closed = True
        while self._idle:
            trio.lowlevel.reschedule(self._idle.pop())

    def unstarted(self) -> list[Job]:
        """The jobs no task took (once the nursery is cancelled), taken out."""
        jobs = list(self._queue)
        self._queue.clear()
        return jobs

    async def _work(self) -> None:
        while True:
            while not self._queue:
                if self._closed:
                    return
                await self._park()
            await self._run(self._queue.popleft())

    async def _park(self) -> None:
        task = trio.lowlevel.current_task()
        self._idle.append(task)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._idle.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
