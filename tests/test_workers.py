"""A connection's request tasks (transport/workers.py): every job runs, at most ``limit``
at once, tasks are reused, ``close`` ends them, and cancelling leaves the rest unstarted."""

from __future__ import annotations

import trio
import trio.testing

from blockfuse.transport.workers import Workers


async def test_every_job_runs_at_most_limit_at_once_on_reused_tasks() -> None:
    running, most, tasks = 0, 0, set()

    async def run(job: int) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        tasks.add(trio.lowlevel.current_task())
        await trio.sleep(0.001 * (job % 3))
        running -= 1
        done.append(job)

    done: list[int] = []
    async with trio.open_nursery() as nursery:
        workers = Workers(nursery, 4, run)
        for job in range(10):
            workers.submit(job)
        await trio.testing.wait_all_tasks_blocked()
        for job in range(10, 20):
            workers.submit(job)
        workers.close()
    assert sorted(done) == list(range(20))
    assert most == 4
    assert len(tasks) == 4


async def test_close_ends_parked_tasks() -> None:
    async def run(job: int) -> None:
        await trio.lowlevel.checkpoint()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            workers = Workers(nursery, 2, run)
            workers.submit(1)
            workers.submit(2)
            await trio.testing.wait_all_tasks_blocked()
            workers.close()


async def test_cancelled_jobs_never_taken_are_unstarted() -> None:
    release = trio.Event()

    async def run(job: int) -> None:
        await release.wait()

    async with trio.open_nursery() as nursery:
        workers = Workers(nursery, 1, run)
        for job in range(3):
            workers.submit(job)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert workers.unstarted() == [1, 2]
    assert workers.unstarted() == []
