"""Keeping an NBD export reachable across dropped connections, within a deadline.

Every NBD request blockfuse sends is idempotent (a READ, a WRITE of the same bytes to
the same place, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS), so a request that was in flight
when the connection dropped can simply be sent again on a new connection.  ``run(op)``
does that, and bounds it in time: the operation has one deadline, ``timeout`` seconds
after it began, for everything it waits for (a new connection, the backoff between
attempts, its requests' answers); past it the operation is cancelled and fails with
``TimedOut`` (ETIMEDOUT)::

    run(read) --- request ---X (dropped)  attempt: connect + handshake ---- request --- ok
              |<----------------------------- timeout ------------------------------>|
                                          past the deadline: TimedOut (ETIMEDOUT)

- Two clocks, one number.  The operation's deadline bounds what its caller waits.  The
  connection has its own: a request unanswered ``timeout`` seconds after it was sent
  means the server stalled, and the client's reader drops that connection (client.py);
  the other requests in flight on it are sent again on a new one, within their own
  deadlines.  A request sent late in its operation's time (after a slow reconnect) can
  thus time out without its fresh connection being dropped for it.
- Reconnecting is one attempt at a time, shared: every operation that needs a connection
  while an attempt is under way waits for that attempt (until its own deadline), so a
  burst of failed requests makes one new connection, not many.  An attempt is a task of
  its own in the link's nursery, bounded by ``timeout`` (connect and handshake) after a
  backoff that grows with consecutive failed attempts (``backoff`` doubling to
  ``max_backoff``), so a server that accepts and never greets costs each waiting
  operation at most its deadline, however many operations wait.
- An operation also gives up after ``retries`` failed tries (a server that refuses
  connections at once): ``Unreachable`` (EIO).  The next operation starts a fresh budget,
  so a mount stays up while the server is away and recovers when it comes back.

Writes the server acknowledged are another matter: until a FLUSH covers them they may
live only in the server's memory, and a FLUSH on a new connection need not cover what
was acknowledged on the old one (nbd-server with ``copyonwrite`` drops it outright).  So
when a connection is lost holding such writes, the next ``flush`` fails with EIO (once,
like fsync after a lost page), instead of promising durability it cannot know.

A new connection must find the export the device was opened on: the same size, sector
size and read-only flag.  One that does not (the server was restarted with another
image) is closed at once and counts as a failed attempt, so I/O fails rather than
reaching the wrong disk.

A ``ProtocolError`` is not retried (a server that breaks the protocol would break it
again); it fails that request, and the next request reconnects.  ``aclose`` cancels an
attempt under way and closes the connection: bounded, like ``NBDClient.aclose``.

The log says what happens, one line each: a connection lost (with why), a reconnect
that failed (a few lines per minute while the server stays away), the reconnect that
worked (after how many failed attempts, how long).
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from ..errors import BlockError, Disconnected, ProtocolError, RequestFailed, Unreachable
from ..log import Repeats, left_out
from ..units import printable
from .client import NBDClient
from .handshake import ConnectionLost, TimedOut

T = TypeVar("T")
Connect = Callable[[trio.Nursery], Awaitable[NBDClient]]
Operation = Callable[[NBDClient], Awaitable[T]]

log = logging.getLogger(__name__)


@dataclass
class Attempt:
    """One reconnect, shared by every operation that waits for it."""

    done: trio.Event = field(default_factory=trio.Event)
    error: BlockError | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


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
        self.timeout = first.timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._closed = False
        self._attempt: Attempt | None = None
        self._failed_attempts = 0
        """Consecutive failed attempts (the backoff grows with them)."""
        self._next_attempt_at = -math.inf
        self.reconnects = 0
        self.last_failure: str = ""
        self._lost_writes = ""
        """Why the next flush must fail: writes acknowledged on a lost connection."""
        self._lost_at: float | None = None
        """When the connection was found lost (``None`` while connected)."""
        self._failure_lines = Repeats(burst=3, period=60.0)

    async def run(self, op: Operation[T], what: str = "a request") -> T:
        """``op`` (``what``, for messages) on a working connection, retried over
        reconnects until its deadline; see the module text."""
        failure: BlockError | None = None
        with trio.move_on_after(self.timeout):
            for _ in range(self.retries + 1):
                try:
                    return await op(await self._usable())
                except ConnectionLost as exc:
                    self.last_failure = f"{what}: {exc}"
                    failure = exc
                except ProtocolError as exc:
                    self.last_failure = f"{what}: {exc}"
                    raise
            raise Unreachable(
                f"{self.server}: still unreachable after {self.retries} retries: {failure}"
            ) from failure
        late = f"no answer from {self.server} within {self.timeout:g} s"
        if failure is not None:
            late += f" (last: {failure})"
        self.last_failure = f"{what}: {late}"
        raise TimedOut(f"{what} got {late}") from failure

    async def _usable(self) -> NBDClient:
        """The connection, after waiting for a shared attempt if it is broken.  What an
        attempt made is returned even if it broke since: the operation then fails on it
        and counts a try, so a server that breaks every new connection at once is not
        reconnected to without end."""
        if self._closed:
            raise Disconnected(f"connection to {self.server} is closed")
        if self.client.broken is None:
            return self.client
        attempt = self._attempt or self._start_attempt()
        await attempt.done.wait()
        if attempt.error is not None:
            raise attempt.error
        return self.client

    def _start_attempt(self) -> Attempt:
        if self._lost_at is None:
            self._lost_at = trio.current_time()
            why = clipped(str(self.client.broken)) if self.client.broken else "closed"
            log.warning("%s: connection lost (%s); reconnecting", self.server, why)
        attempt = self._attempt = Attempt()
        self._nursery.start_soon(self._reconnect, attempt)
        return attempt

    def _log_attempt(self, error: BlockError | None) -> None:
        if self._closed:
            return
        if error is None:
            took = trio.current_time() - (self._lost_at or trio.current_time())
            failed = plural(self._failed_attempts, "failed attempt")
            log.info("%s: reconnected after %s, %.1f s", self.server, failed, took)
            self._lost_at = None
        elif (skipped := self._failure_lines.allow("attempt")) is not None:
            log.warning(
                "%s: reconnecting failed: %s%s", self.server, clipped(str(error)), left_out(skipped)
            )

    async def _reconnect(self, attempt: Attempt) -> None:
        """One attempt (a task of its own): backoff, then connect within ``timeout``."""
        try:
            with attempt.scope:
                await trio.sleep_until(self._next_attempt_at)
                await self._replace_client()
            if attempt.scope.cancelled_caught:
                attempt.error = Disconnected(f"connection to {self.server} is closed")
        except (ConnectionLost, Disconnected) as exc:
            attempt.error = exc
        except BlockError as exc:  # refused, or a protocol error: worth another attempt
            attempt.error = ConnectionLost(f"reconnecting to {self.server} failed: {exc}")
        finally:
            self._attempt = None
            self._log_attempt(attempt.error)
            if attempt.error is None:
                self._failed_attempts = 0
            else:
                self._failed_attempts += 1
                pause = self.backoff * 2 ** (self._failed_attempts - 1)
                self._next_attempt_at = trio.current_time() + min(pause, self.max_backoff)
            attempt.done.set()

    async def _replace_client(self) -> None:
        if self.client.has_unflushed_writes:
            self._lost_writes = (
                f"{self.server}: the connection was lost after the server acknowledged "
                f"writes that no flush had covered; they may not be on stable storage"
            )
        await self.client.aclose()
        with trio.move_on_after(self.timeout):
            client = await self._connect(self._nursery)
            if self._closed:
                await client.aclose()
                raise Disconnected(f"connection to {self.server} is closed")
            if (changed := export_change(self.client, client)) is not None:
                await client.aclose()
                raise ConnectionLost(f"reconnected to {self.server}, but {changed}")
            self.client = client
            self.reconnects += 1
            return
        raise ConnectionLost(f"reconnecting to {self.server}: no answer within {self.timeout:g} s")

    async def flush(self) -> None:
        """FLUSH on a working connection; EIO (once) if writes may have been lost."""
        await self.run(lambda c: c.flush(), "flush")
        if self._lost_writes:
            message, self._lost_writes = self._lost_writes, ""
            raise RequestFailed(errno.EIO, message)

    def state(self) -> str:
        """One line: ``connected``, ``reconnecting``, ``disconnected[: why]``, ``closed``;
        then how many reconnects and the last failure (what failed, and why), clipped
        and escaped."""
        if self._closed:
            return "closed"
        broken = self.client.broken
        if broken is None:
            head = "connected"
        else:
            head = "reconnecting" if self._attempt is not None else "disconnected"
            if not self.last_failure:
                head += f": {clipped(str(broken))}"
        notes = []
        if self.reconnects:
            notes.append(f"reconnected {plural(self.reconnects, 'time')}")
        if self.last_failure:
            notes.append(f"last: {clipped(self.last_failure)}")
        return "; ".join([head, ", ".join(notes)]) if notes else head

    async def aclose(self) -> None:
        """Stop any attempt and close the connection (DISC); never fails, idempotent,
        bounded."""
        self._closed = True
        if self._attempt is not None:
            self._attempt.scope.cancel()
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
