"""Opening devices: the context a set of openings shares, and what a failed one undoes.

Some devices need a task that outlives the call that opened them (an NBD connection's
reader, a mirror's copier).  Their openers take an ``OpenContext`` that the caller
passes down explicitly: its ``nursery`` is where such tasks run, visible to the caller,
whose exceptions propagate out of it, and which the caller cancels after closing the
devices.  Nothing is found through a global or a context variable, so a device can be
opened and tested with a context of its own.

Opening several devices is all or nothing (``open_all``): a mount whose third device
fails must leave no trace of the first two.  So openings note the files they create
(``ctx.note_created``), removed again if the block fails, and queue work that would
write to a device on its own, such as a mirror's copier (``ctx.start_when_all_open``),
to start only once the block succeeded::

    async with background_tasks() as nursery:
        async with open_all(nursery) as ctx:
            devices = [await recipe.open(ctx) for recipe in recipes]
        ...  # copiers run from here on
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)

Start = Callable[[], Awaitable[object]]


@dataclass
class OpenContext:
    """What one opening of a set of devices shares: where background tasks run, which
    files it created, and what to start once every device is open."""

    nursery: trio.Nursery
    created: list[str] = field(default_factory=list)
    starts: list[Start] = field(default_factory=list)

    def note_created(self, path: str) -> None:
        """``path`` was created by this opening: remove it if the opening fails."""
        self.created.append(path)

    def start_when_all_open(self, start: Start) -> None:
        """Run ``start`` once every device of this opening is open."""
        self.starts.append(start)


@asynccontextmanager
async def background_tasks() -> AsyncIterator[trio.Nursery]:
    """A nursery for the background tasks of devices opened inside this block.

    An ordinary exception from the body leaves the block as itself, not wrapped in an
    exception group, so that callers still catch their own errors (``CommandError``);
    a background task's exception ends the block as an exception group.  Leaving the
    block cancels what still runs (the devices must be closed by then).
    """
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        try:
            yield nursery
        except Exception as exc:
            failure = exc
        finally:
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


@asynccontextmanager
async def open_all(nursery: trio.Nursery) -> AsyncIterator[OpenContext]:
    """Open devices in the body with the context it yields.  If the body raises, remove
    the files they created (close the devices first); if not, start what they queued."""
    ctx = OpenContext(nursery)
    try:
        yield ctx
    except BaseException:
        remove_created(ctx.created)
        raise
    for start in ctx.starts:
        await start()


def remove_created(paths: list[str]) -> None:
    for path in reversed(paths):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s, created by the failed opening: %s", path, exc)
