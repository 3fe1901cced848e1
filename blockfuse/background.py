"""Where devices' background tasks live, and what opening a set of devices must undo.

Some devices need a task that outlives the call that opened them (an NBD connection's
reader, a mirror's copier).  ``Recipe.open()`` takes no arguments, so the opener of a
whole set of devices (``blockfuse mount``, a test) runs the openings inside
``background_tasks()``, and a device's opener picks the nursery up with
``background_nursery()``.  The nursery is visible: it belongs to the ``async with``
block, its tasks' exceptions propagate out of it, and leaving the block cancels what is
still running (after the devices were closed).

Opening several devices is all or nothing (``all_or_nothing()``): a mount whose third
device fails must leave no trace of the first two.  So openings note the files they
create (``note_created``), removed again if the block fails, and queue work that would
write to a device on its own, such as a mirror's copier (``start_when_all_open``), to
start only once the block succeeded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)

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


@dataclass
class Opening:
    """What the openings inside one ``all_or_nothing()`` block did and queued."""

    created: list[str] = field(default_factory=list)
    starts: list[Callable[[], Awaitable[object]]] = field(default_factory=list)


_opening: ContextVar[Opening | None] = ContextVar("blockfuse_opening", default=None)


@asynccontextmanager
async def all_or_nothing() -> AsyncIterator[None]:
    """Open devices in the body.  If it raises, remove the files they created (close the
    devices first); if not, start what they queued with ``start_when_all_open``."""
    opening = Opening()
    token = _opening.set(opening)
    try:
        yield
    except BaseException:
        remove_created(opening.created)
        raise
    finally:
        _opening.reset(token)
    for start in opening.starts:
        await start()


def note_created(path: str) -> None:
    """``path`` was created by the opening under way: remove it if the opening fails."""
    opening = _opening.get()
    if opening is not None:
        opening.created.append(path)


async def start_when_all_open(start: Callable[[], Awaitable[object]]) -> None:
    """Run ``start`` once every device of the opening under way opened (now, if none is)."""
    opening = _opening.get()
    if opening is None:
        await start()
    else:
        opening.starts.append(start)


def remove_created(paths: list[str]) -> None:
    for path in reversed(paths):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s, created by the failed opening: %s", path, exc)
