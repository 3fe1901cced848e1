"""Where devices' background tasks live: a nursery owned by whoever opens devices.

Some devices need a task that outlives the call that opened them (an NBD connection's
reader, a mirror's copier).  ``Recipe.open()`` takes no arguments, so the opener of a
whole set of devices (``blockfuse mount``, a test) runs the openings inside
``background_tasks()``, and a device's opener picks the nursery up with
``background_nursery()``.  The nursery is visible: it belongs to the ``async with``
block, its tasks' exceptions propagate out of it, and leaving the block cancels what is
still running (after the devices were closed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar

import trio

_nursery: ContextVar[trio.Nursery | None] = ContextVar("blockfuse_background", default=None)


@asynccontextmanager
async def background_tasks() -> AsyncIterator[trio.Nursery]:
    """A nursery for the background tasks of devices opened inside this block.

    An ordinary exception from the body leaves the block as itself, not wrapped in an
    exception group, so that callers still catch their own errors (``CommandError``);
    a background task's exception ends the block as an exception group.
    """
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        token = _nursery.set(nursery)
        try:
            yield nursery
        except Exception as exc:
            failure = exc
        finally:
            _nursery.reset(token)
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


def background_nursery() -> trio.Nursery:
    """The nursery of the innermost ``background_tasks()``; raises ``RuntimeError`` outside."""
    nursery = _nursery.get()
    if nursery is None:
        raise RuntimeError("devices with background tasks must be opened inside background_tasks()")
    return nursery
