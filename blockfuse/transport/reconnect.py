"""Keeping an NBD export reachable across dropped connections.

Every NBD request blockfuse sends is idempotent (a READ, a WRITE of the same bytes to
the same place, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS), so a request that was in flight
when the connection dropped can simply be sent again on a new connection.  ``run(op)``
does that: on ``ConnectionLost`` it reconnects with exponential backoff (bounded by
``max_backoff``) and retries, at most ``retries`` times; then the request fails with
``RequestFailed(EIO)`` and the next request starts a fresh budget, so a mount stays up
while the server is away and recovers when it comes back.

Writes the server acknowledged are another matter: until a FLUSH covers them they may
live only in the server's memory, and a FLUSH on a new connection need not cover what
was acknowledged on the old one (nbd-server with ``copyonwrite`` drops it outright).  So
when a connection is lost holding such writes, the next ``flush`` fails with EIO (once,
like fsync after a lost page), instead of promising durability it cannot know.

A new connection must find the export the device was opened on: the same size, sector
size and read-only flag.  One that does not (the server was restarted with another
image) is closed at once and counts as a failed try, so I/O fails with EIO rather than
reaching the wrong disk.

A ``ProtocolError`` is not retried (a server that breaks the protocol would break it
again); it fails that request, and the next request reconnects.  One lock serialises
reconnecting, so a burst of failed requests makes one new connection, not many.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from ..errors import BlockError, Disconnected, RequestFailed, Unreachable
from ..units import printable
from .client import NBDClient
from .handshake import ConnectionLost

T = TypeVar("T")
Connect = Callable[[trio.Nursery], Awaitable[NBDClient]]


class Reconnecting:
    def __init__(
        self,
        nursery: trio.Nursery,
        connect: Connect,
        first: NBDClient,
        *,
        retries: int = 5,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
    ) -> None:
        self._nursery = nursery
        self._connect = connect
        self.client = first
        self.server = first.server
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._lock = trio.Lock()
        self._closed = False
        self.reconnects = 0
        self.last_failure: str = ""
        self._lost_writes = ""
        """Why the next flush must fail: writes acknowledged on a lost connection."""

    async def run(self, op: Callable[[NBDClient], Awaitable[T]], what: str = "a request") -> T:
        """``op`` (``what``, for the status) on a working connection, retried over
        reconnects; see the module text."""
        failure: BlockError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await trio.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            try:
                return await op(await self._usable())
            except ConnectionLost as exc:
                failure = exc
                self.last_failure = f"{what}: {exc}"
        raise Unreachable(
            f"{self.server}: still unreachable after {self.retries} retries: {failure}"
        ) from failure

    async def _usable(self) -> NBDClient:
        async with self._lock:
            if self._closed:
                raise Disconnected(f"connection to {self.server} is closed")
            if self.client.broken is None:
                return self.client
            if self.client.has_unflushed_writes:
                self._lost_writes = (
                    f"{self.server}: the connection was lost after the server acknowledged "
                    f"writes that no flush had covered; they may not be on stable storage"
                )
            await self.client.aclose()
            try:
                client = await self._connect(self._nursery)
            except BlockError as exc:
                raise ConnectionLost(f"reconnecting to {self.server} failed: {exc}") from exc
            if (changed := export_change(self.client, client)) is not None:
                await client.aclose()
                raise ConnectionLost(f"reconnected to {self.server}, but {changed}")
            self.client = client
            self.reconnects += 1
            return self.client

    async def flush(self) -> None:
        """FLUSH on a working connection; EIO (once) if writes may have been lost."""
        await self.run(lambda c: c.flush(), "flush")
        if self._lost_writes:
            message, self._lost_writes = self._lost_writes, ""
            raise RequestFailed(errno.EIO, message)

    def state(self) -> str:
        """One line: ``connected``, ``disconnected[: why]``, ``closed``; then how many
        reconnects and the last failure (what failed, and why), clipped and escaped."""
        if self._closed:
            return "closed"
        broken = self.client.broken
        head = "connected" if broken is None else "disconnected"
        if broken is not None and not self.last_failure:
            head += f": {clipped(str(broken))}"
        notes = []
        if self.reconnects:
            notes.append(f"reconnected {plural(self.reconnects, 'time')}")
        if self.last_failure:
            notes.append(f"last: {clipped(self.last_failure)}")
        return "; ".join([head, ", ".join(notes)]) if notes else head

    async def aclose(self) -> None:
        """Close the current connection (DISC); never fails, idempotent."""
        self._closed = True
        await self.client.aclose()


MAX_REASON = 200
"""The most characters of a failure's text in the one-line status."""


def clipped(text: str) -> str:
    text = printable(text)
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def export_change(old: NBDClient, new: NBDClient) -> str | None:
    """How the export behind ``new`` differs from the one behind ``old``, if it does."""
    a, b = old.export, new.export
    for what, before, now in [
        ("size", a.size, b.size),
        ("minimum block size", a.min_block, b.min_block),
        ("read-only flag", a.read_only, b.read_only),
    ]:
        if before != now:
            return f"the export's {what} changed from {before} to {now}; not using it"
    return None
