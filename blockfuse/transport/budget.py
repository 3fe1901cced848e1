"""Bounds on what NBD clients may make the server hold: requests and bytes in flight.

A request holds, from when its header is read until its reply has been written, one of
its connection's request slots and the bytes it needs (a WRITE's payload, a READ's
data) of two budgets: its connection's and the whole server's.  The reader of a
connection takes them before it reads on, so a client that sends faster than the
devices answer (or reads replies slower) is held back by TCP itself: backpressure,
never unbounded buffering.  The server-wide budget is what bounds memory however many
clients connect::

    header read -> slot (connection) -> bytes (connection) -> bytes (server) -> work
                                                      reply written -> all released

``ByteBudget`` hands out bytes in arrival order (no request starves behind smaller ones)
and lets a request bigger than what is free proceed once nothing else is held, so one
request larger than the budget still runs, alone.  The slots are a ``ByteBudget`` too,
each request taking one unit: unlike ``trio.Semaphore`` it takes no trip through the
scheduler when a slot is free, and it runs once per request.
"""

from __future__ import annotations

from collections import deque

import trio


class ByteBudget:
    """At most ``limit`` bytes held at once (or one holder of more); FIFO."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiting: deque[tuple[int, trio.Event]] = deque()

    def acquire_now(self, n: int) -> bool:
        """Hold ``n`` more bytes if that needs no wait (``acquire`` would hold them at
        once); ``False``, holding nothing more, otherwise."""
        if self._waiting or not self._fits(n):
            return False
        self.held += n
        return True

    def _fits(self, n: int) -> bool:
        return self.held == 0 or self.held + n <= self.limit

    async def acquire(self, n: int) -> None:
        """Hold ``n`` more bytes, waiting for them in turn.  No checkpoint when they are
        free at once (it runs once per request)."""
        if self.acquire_now(n):
            return
        granted = trio.Event()
        entry = (n, granted)
        self._waiting.append(entry)
        try:
            await granted.wait()
        except BaseException:
            if granted.is_set():
                self.release(n)
            else:
                self._waiting.remove(entry)
                self._grant()
            raise

    def release(self, n: int) -> None:
        self.held -= n
        if self._waiting:  # it runs three times a request: no call when nobody waits
            self._grant()

    def _grant(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            n, granted = self._waiting.popleft()
            self.held += n
            granted.set()


class Reservation:
    """What one request holds; ``release`` gives it all back, once."""

    def __init__(self, slots: ByteBudget, budgets: tuple[ByteBudget, ...]) -> None:
        self._slots = slots
        self._budgets = budgets
        self._held: list[ByteBudget] = []
        self._slot = False
        self.bytes = 0

    def take_now(self, n: int) -> bool:
        """``take(n)`` if all of it is free at once; ``False``, holding nothing, otherwise."""
        if not self._slots.acquire_now(1):
            return False
        self._slot = True
        self.bytes = n
        for budget in self._budgets:
            if not budget.acquire_now(n):
                self.release()
                return False
            self._held.append(budget)
        return True

    async def take(self, n: int) -> None:
        """A slot, then ``n`` bytes of every budget in order; on cancellation what was
        taken is given back."""
        try:
            await self._slots.acquire(1)
            self._slot = True
            self.bytes = n
            for budget in self._budgets:
                await budget.acquire(n)
                self._held.append(budget)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for budget in self._held:
            budget.release(self.bytes)
        self._held.clear()
        if self._slot:
            self._slot = False
            self._slots.release(1)
