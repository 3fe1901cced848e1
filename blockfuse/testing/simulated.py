"""Simulated storage for the crash harness: a disk with a write cache and a map store.

``SimDisk``
    Reads see every write; ``stable`` holds what flushes made durable.  A write is kept
    per sector as *pending* until a flush that began after it ends; ``crash_image`` is
    the stable bytes plus any subset of the pending sectors, applied in the order they
    were written (so a sector ends up old, or one of the versions written since).  A
    write may fail half done (some sectors land); a flush may fail, losing some of what
    it should have made durable (the cache still shows it, as Linux's page cache does
    after a writeback error), and records the loss in ``write_errors``.

``SimStore``
    A map store whose save is atomic and durable when it returns; one in flight at a
    crash is there or not.  Saves and invalidations may fail (ENOSPC, EROFS, EIO).

Both call ``event(what)`` at each write, flush and save, where the harness may cut power.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from ..block import BlockDevice, Buffer, Capability, Info
from ..devices.mirror.mapfile import INVALID_MAGIC
from ..errors import Disconnected, RequestFailed

SS = 512
Event = Callable[[str], None]


@dataclass
class Faults:
    """Probabilities of failing each kind of operation, while ``on``."""

    rng: random.Random
    p: dict[str, float] = field(default_factory=dict)
    on: bool = True

    def fire(self, op: str) -> bool:
        return self.on and self.rng.random() < self.p.get(op, 0.0)


NO_FAULTS = Faults(random.Random(0), on=False)


class SimDisk(BlockDevice):
    kind = "simdisk"

    def __init__(
        self,
        image: bytes,
        *,
        rng: random.Random,
        faults: Faults = NO_FAULTS,
        event: Event = lambda what: None,
        name: str = "disk",
    ) -> None:
        self.current = bytearray(image)
        self.stable = bytearray(image)
        self.pending: list[tuple[int, int, bytes]] = []
        """``(seq, sector, data)`` written and not yet durable, in the order written."""
        self._seq = 0
        self._rng = rng
        self._faults = faults
        self._event = event
        self.name = name
        self._closed = False
        self.capabilities = frozenset({Capability.WRITE_ZEROES, Capability.DISCARD})

    async def _jitter(self) -> None:
        for _ in range(self._rng.randrange(3)):
            await trio.lowlevel.checkpoint()

    def _check(self) -> None:
        if self._closed:
            raise Disconnected(f"{self.name} is closed")

    async def get_info(self) -> Info:
        self._check()
        return Info(True, SS, len(self.current) // SS)

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        self._check()
        await self._jitter()
        if self._faults.fire("read"):
            raise RequestFailed(errno.EIO, f"injected read fault on {self.name}")
        offset = sector * SS
        for buf in buffers:
            n = len(buf)
            memoryview(buf).cast("B")[:] = self.current[offset : offset + n]
            offset += n

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        data = b"".join(bytes(b) for b in buffers)
        await self._write(sector, data)

    async def write_zeroes(self, sector: int, count: int) -> None:
        await self._write(sector, bytes(count * SS))

    async def discard(self, sector: int, count: int) -> None:
        await self._write(sector, bytes(count * SS))

    async def _write(self, sector: int, data: bytes) -> None:
        self._check()
        await self._jitter()
        torn = self._faults.fire("write")
        for i in range(len(data) // SS):
            if torn and self._rng.random() < 0.5:
                continue
            self._seq += 1
            piece = data[i * SS : (i + 1) * SS]
            self.pending.append((self._seq, sector + i, piece))
            self.current[(sector + i) * SS : (sector + i + 1) * SS] = piece
        self._event(f"{self.name} write")
        if torn:
            raise RequestFailed(errno.EIO, f"injected write fault on {self.name}")
        await self._jitter()

    async def flush(self) -> None:
        self._check()
        upto = self._seq
        self._event(f"{self.name} flush begins")
        await self._jitter()
        lose = self._faults.fire("flush")
        keep = []
        for seq, sector, piece in self.pending:
            if seq > upto:
                keep.append((seq, sector, piece))
            elif not lose or self._rng.random() < 0.5:
                self.stable[sector * SS : (sector + 1) * SS] = piece
        self.pending = keep
        self._event(f"{self.name} flush ends")
        if lose:
            err = RequestFailed(errno.EIO, f"injected flush fault on {self.name}")
            self.write_errors.record(err)
            raise err
        await self._jitter()

    async def aclose(self) -> None:
        self._closed = True

    def crash_image(self, rng: random.Random) -> bytes:
        """What a power cut now would leave: ``stable``, plus any subset of pending."""
        out = bytearray(self.stable)
        for _, sector, piece in self.pending:
            if rng.random() < 0.5:
                out[sector * SS : (sector + 1) * SS] = piece
        return bytes(out)


class SimStore:
    """A ``MapStore`` in memory: saves atomic, durable once they return."""

    name = "simulated map"

    def __init__(
        self,
        text: str | None = None,
        *,
        rng: random.Random | None = None,
        faults: Faults = NO_FAULTS,
        event: Event = lambda what: None,
    ) -> None:
        self.durable = text
        self.in_flight: str | None = None
        self._rng = rng or random.Random(0)
        self._faults = faults
        self._event = event

    def load(self) -> str | None:
        return self.durable

    async def save(self, text: str) -> None:
        await self._step("save", text)

    async def invalidate(self) -> None:
        await self._step("invalidate", INVALID_MAGIC + "\n")

    async def _step(self, op: str, text: str) -> None:
        await trio.lowlevel.checkpoint()
        if self._faults.fire(op):
            err = self._rng.choice([errno.ENOSPC, errno.EROFS, errno.EIO])
            raise OSError(err, os.strerror(err))
        self.in_flight = text
        self._event(f"map {op}")
        await trio.lowlevel.checkpoint()
        self.durable, self.in_flight = text, None

    def crash_image(self, rng: random.Random) -> str | None:
        if self.in_flight is not None and rng.random() < 0.5:
            return self.in_flight
        return self.durable
