"""The block device contract (after MirageOS's ``Mirage_block.S``), read this first.

A device is a run of ``size_sectors`` sectors of ``sector_size`` bytes.  All I/O is
async and sector-addressed; buffers are writable (for ``read``) or readable (for
``write``) bytes-like objects, each a whole number of sectors long, used in order.

Every device tolerates concurrent calls: the FUSE front end runs up to 99 handlers at
once.  Errors are the ``blockfuse.errors`` vocabulary and nothing else.

Optional capabilities are declared in ``capabilities``, never guessed: a caller checks
``Capability.RESIZE in dev.capabilities`` before calling ``resize``; a device that does
not declare one raises ``Unimplemented`` from it and does nothing.

Errors that mean acknowledged writes may be lost (a flush that failed, a connection
lost holding writes the server had acknowledged) reach *every* caller that could rely
on those writes, not just the first one to flush (Linux's ``errseq_t`` rule, after
PostgreSQL's 2018 "fsyncgate"): the device raises it from the flush in progress and
records it in ``write_errors``; each flush caller (an open file, an NBD connection, a
mirror's checkpoint) flushes through its own ``FlushCursor``, which also raises every
error recorded since that caller's last flush.

Ranges: device calls take ``(sector, count)`` or ``(sector, buffers)``; inside
blockfuse every range of sectors is half-open, ``[start, end)``.
"""

from __future__ import annotations

import enum
import errno
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from .errors import BlockError, RequestFailed, Unimplemented, Unsafe
from .filerange import FileRange
from .threads import WorkerThreads

Buffer = bytearray | memoryview | bytes
"""A run of bytes handed to ``read`` (must be writable) or ``write``."""

SECTOR_SIZE = 512

Filler = Callable[[memoryview], None]
"""A blocking call that fills a buffer (``write_filled``)."""


@dataclass(frozen=True)
class Info:
    """What ``get_info`` answers: writability and geometry."""

    read_write: bool
    sector_size: int
    size_sectors: int

    @property
    def size_bytes(self) -> int:
        return self.sector_size * self.size_sectors


@dataclass(frozen=True)
class Extent:
    """A run of sectors that either holds data or is a hole (reads as zeroes)."""

    sector: int
    count: int
    is_data: bool

    @property
    def end(self) -> int:
        return self.sector + self.count


class Capability(enum.Enum):
    DISCARD = "discard"
    WRITE_ZEROES = "write_zeroes"
    RESIZE = "resize"
    EXTENTS = "extents"


class WriteErrors:
    """The errors a device recorded that mean acknowledged writes may be lost, in order.

    Only the count and the latest error are kept: a cursor that missed several sees the
    latest one, once (as ``errseq_t`` does)."""

    def __init__(self) -> None:
        self.count = 0
        self.latest: BlockError | None = None

    def record(self, err: BlockError) -> None:
        """Called from worker threads too (under the recorder's own lock): ``latest`` is
        set before ``count``, so a reader that sees the new count sees its error."""
        self.latest = err
        self.count += 1

    def since(self, seen: int) -> BlockError | None:
        """The latest error if any was recorded after ``seen`` (a past ``count``)."""
        return self.latest if self.count > seen else None


class BlockDevice(ABC):
    """An async block device.  Subclasses implement the five core methods.

    Each method documents what it raises and what a failure leaves behind.  Cancellation
    of a call may leave a write partly done, as an error would.
    """

    kind: str = "device"
    """A short name for the kind of device, shown as ``user.blockfuse.kind``."""

    label: str = ""
    """The name a front end shows the device as (``disk``), for log lines; set by
    whoever opens it (``label_layers``), empty until then."""

    capabilities: frozenset[Capability] = frozenset()

    durable: bool = True
    """Whether what is written stays when the device is closed and opened again (a ``mem``
    device forgets it).  ``is_durable`` asks every layer."""

    cheap_extents: bool = False
    """Whether ``extents`` answers from what the device knows already (no I/O, no worker
    thread), so that a front end may ask it for every read: the NBD server then sends the
    holes in a READ as holes.  (Files find holes with ``SEEK_DATA`` in a thread, ~0.1 ms:
    more than most reads would save.)"""

    @abstractmethod
    async def get_info(self) -> Info:
        """The device's current geometry; raises ``Disconnected`` after ``aclose``."""

    @abstractmethod
    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        """Fill ``buffers`` one after another from ``sector`` on.

        On error some buffers may be unfilled.  Raises ``Unsafe`` (bad request),
        ``Disconnected``, ``RequestFailed`` or ``ProtocolError``.
        """

    @abstractmethod
    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        """Write ``buffers`` in order from ``sector`` on.

        A read-only device raises ``ReadOnly`` and writes nothing.  On any other error
        some of the write may have happened.  The caller must not change the buffers
        until the call returns.
        """

    @abstractmethod
    async def flush(self) -> None:
        """Make everything written before this call durable where the device can."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release the device.  Never fails, idempotent; later I/O raises ``Disconnected``."""

    async def discard(self, sector: int, count: int) -> None:
        """Forget ``count`` sectors from ``sector``; they may read back as anything."""
        raise Unimplemented(f"{self.kind} devices cannot discard")

    async def write_zeroes(self, sector: int, count: int) -> None:
        """Make ``count`` sectors from ``sector`` read back as zeroes."""
        raise Unimplemented(f"{self.kind} devices cannot write zeroes efficiently")

    async def resize(self, size_sectors: int) -> None:
        """Grow (reading back zeroes) or shrink (dropping data past the end) the device.

        A device has at least one sector: a size below 1 raises ``Unsafe`` and changes
        nothing (``check_new_size``), as a 0-byte device is refused when it opens."""
        raise Unimplemented(f"{self.kind} devices cannot be resized")

    async def extents(self, sector: int, count: int) -> list[Extent]:
        """Which parts of ``[sector, sector+count)`` hold data and which are holes.

        The answer covers the range from ``sector`` in order; it may stop early (the
        caller asks again from where it stopped).  A device without ``EXTENTS`` raises
        ``Unimplemented``; a caller then treats everything as data.
        """
        raise Unimplemented(f"{self.kind} devices cannot report extents")

    def lend(self, sector: int, count: int) -> FileRange | None:
        """Whole sectors inside the device as a range of a file that holds them, for a
        front end to send straight from it (an NBD READ reply, ``os.sendfile``), or
        ``None``: by default, and wherever a device cannot (see ``FileDevice.lend`` for
        what the caller must keep to: it releases the range once sent).  No waiting, no
        I/O but a look at the page cache.  A wrapper lends nothing unless it says so:
        what it does to reads would be skipped."""
        return None

    def lend_writable(self, sector: int, count: int) -> FileRange | None:
        """Whole sectors inside the device as a range of a file that *is* them, for a
        front end to write into straight (an NBD WRITE's payload spliced from the socket
        into the file: one copy instead of two), or ``None``: by default, and wherever a
        write must go through the device (see ``FileDevice.lend_writable``).  Bytes
        written into the range are the device's as ``write`` would have left them; the
        caller keeps other writers off it and releases it once done.  A wrapper lends
        nothing unless it says so: what it does to writes would be skipped."""
        return None

    def read_now(self, offset: int, into: memoryview) -> bool:
        """Fill ``into`` with the bytes from byte ``offset`` on, at once: no waiting and
        no blocking call (a file's page cache), so that a front end may answer a request
        without a trip through the scheduler.  ``False`` by default and wherever that
        cannot be done (then nothing is promised about ``into``, and the caller awaits
        ``read``).  Only whole sectors inside the device; no error is raised (the
        awaited ``read`` meets it again and reports it).  A wrapper offers nothing
        unless it says so: what it does to reads would be skipped."""
        return False

    def write_now(self, offset: int, data: memoryview) -> bool:
        """Write ``data`` at byte ``offset`` at once, as ``read_now`` reads: ``True`` once
        all of it is written (as an awaited ``write`` would have written it), ``False``
        by default and wherever that cannot be done without waiting; then any part of it
        may have been written, and the caller awaits ``write`` with all of it.  Only
        whole sectors inside the device; no error is raised.  A wrapper offers nothing
        unless it says so: what it does to writes would be skipped."""
        return False

    async def write_behind(self, sector: int, count: int) -> None:  # noqa: B027
        """Start writing ``count`` sectors from ``sector`` to stable storage, without
        waiting for it (a copier's write-behind, so that its writes do not pile up in a
        cache); promises nothing, ``flush`` still does.  Nothing where a device cannot."""

    async def write_filled(
        self,
        sector: int,
        view: memoryview,
        fill: Filler,
        *,
        threads: WorkerThreads | None = None,
    ) -> None:
        """Write ``view`` at ``sector`` once ``fill(view)`` has put its bytes there, then
        ``write_behind`` it: a bulk copier's data path.

        ``fill`` blocks (it reads another device over a connection of its own), so it
        runs in a worker thread, one of the caller's ``threads`` (trio's default ones if
        none); a device that writes in worker threads anyway does its write in the same
        one (one thread hop per chunk, not three: see ``file.py``).  What ``fill`` raises
        propagates, and then nothing is written.  Otherwise it fails as ``write`` and
        ``write_behind`` do."""
        if threads is None:
            await trio.to_thread.run_sync(fill, view)
        else:
            await threads.run(fill, view)
        await self.write(sector, [view])
        await self.write_behind(sector, len(view) // (await self.get_info()).sector_size)

    def hurry_close(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """A close under way should end sooner (a second Ctrl-C): skip the waits that
        only make it gentler, never a flush or a save.  Nothing by default."""

    @property
    def write_errors(self) -> WriteErrors:
        """Where this device records errors that mean acknowledged writes may be lost."""
        errors: WriteErrors | None = self.__dict__.get("_write_errors")
        if errors is None:
            errors = self.__dict__["_write_errors"] = WriteErrors()
        return errors

    def status(self) -> dict[str, str]:
        """Extra status for the front end (``user.blockfuse.*`` xattrs); empty by default."""
        return {}

    async def control(self, key: str, value: bytes) -> bool:
        """Act on a request written to the xattr ``user.blockfuse.KEY`` (e.g. a mirror's
        ``pivot``).  ``False`` if the key is not this device's; raises a ``BlockError``
        when the device refuses.  The front end asks every layer, outermost first.
        """
        return False

    @property
    def unchecked(self) -> BlockDevice:
        """This device without the contract checks a checking wrapper adds (``safe``), for
        a caller that proves them itself: whole sectors, within the device.  The device
        itself unless it is such a wrapper; every other wrapper keeps its own behaviour."""
        return self

    @property
    def inner(self) -> BlockDevice | None:
        """The device a wrapper stands on, or ``None`` for a device that wraps nothing."""
        return None


class FlushCursor:
    """One flush caller of ``dev``: ``flush`` raises the device's own error, and every
    error recorded in ``dev.write_errors`` since this caller's previous flush (or since
    it was made), each once."""

    def __init__(self, dev: BlockDevice) -> None:
        self._dev = dev
        self._seen = dev.write_errors.count

    async def flush(self) -> None:
        errors = self._dev.write_errors
        try:
            await self._dev.flush()
        except BlockError:
            self._seen = errors.count
            raise
        missed = errors.since(self._seen)
        self._seen = errors.count
        if missed is not None:
            raise missed


def check_new_size(size_sectors: int) -> None:
    """Raise ``Unsafe`` unless a device may be resized to ``size_sectors``: at least one."""
    if size_sectors < 0:
        raise Unsafe(f"cannot resize to a negative size ({size_sectors} sectors)")
    if size_sectors == 0:
        raise Unsafe("cannot resize to 0 bytes: a device has at least one sector")


def total_length(buffers: Sequence[Buffer]) -> int:
    """The number of bytes in ``buffers``."""
    return sum(map(len, buffers))


def layers(dev: BlockDevice) -> list[BlockDevice]:
    """``dev`` and every device under it through ``inner``, outermost first."""
    out = []
    layer: BlockDevice | None = dev
    while layer is not None:
        out.append(layer)
        layer = layer.inner
    return out


def label_layers(dev: BlockDevice, name: str) -> None:
    """Name every layer of ``dev`` ``name`` in log lines."""
    for layer in layers(dev):
        layer.label = name


def is_durable(dev: BlockDevice) -> bool:
    """Whether every layer of ``dev`` keeps what is written across a close."""
    return all(layer.durable for layer in layers(dev))


def merged_status(dev: BlockDevice) -> dict[str, str]:
    """Every layer's ``status()``, the outermost winning on a shared key."""
    out: dict[str, str] = {}
    for layer in reversed(layers(dev)):
        out.update(layer.status())
    return out


async def send_control(dev: BlockDevice, key: str, value: bytes, name: str) -> None:
    """Hand a control request to the first layer, outermost first, that takes it;
    ``RequestFailed(EPERM)`` if none does (``name`` names the device in the message)."""
    for layer in layers(dev):
        if await layer.control(key, value):
            return
    raise RequestFailed(errno.EPERM, f"{name} has no control named {key!r}")
