"""The block contract as a test suite any device or stack can run.

    async def test_memory_conforms():
        await check_block_device(lambda: make_memory())

``make_device`` is an async callable returning a fresh, writable device of at least 64
sectors; ``make_read_only_device`` (optional) one that refuses writes.  Every check
closes what it opened, also when it fails.  A failed check raises ``AssertionError``
naming the check.  Beyond reads and writes, the checks cover every mutator of a
read-only device, cancellation of a call in flight, and ``aclose`` while calls are in
flight (they end with a ``BlockError`` or succeed; nothing hangs, nothing else escapes).
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from ..block import BlockDevice, Capability
from ..devices.safe import SafeDevice
from ..errors import BlockError, Disconnected, ReadOnly, Unimplemented, Unsafe

MakeDevice = Callable[[], Awaitable[BlockDevice]]
MIN_SECTORS = 64


@asynccontextmanager
async def fresh(make: MakeDevice) -> AsyncIterator[tuple[BlockDevice, int, int]]:
    """A new device with its sector size and size, closed at the end whatever happens."""
    dev = await make()
    try:
        info = await dev.get_info()
        assert info.size_sectors >= MIN_SECTORS, f"device too small ({info.size_sectors} sectors)"
        yield dev, info.sector_size, info.size_sectors
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            await dev.aclose()


async def _read(dev: BlockDevice, sector: int, nbytes: int) -> bytes:
    buf = bytearray(nbytes)
    await dev.read(sector, [buf])
    return bytes(buf)


async def check_info(make: MakeDevice) -> None:
    async with fresh(make) as (dev, ss, _):
        info = await dev.get_info()
        assert info.read_write, "make_device must give a writable device"
        assert ss > 0 and ss % 512 == 0, f"odd sector size {ss}"


async def check_round_trip_at_edges(make: MakeDevice) -> None:
    async with fresh(make) as (dev, ss, size):
        for sector in (0, 1, size // 2, size - 1):
            data = os.urandom(ss)
            await dev.write(sector, [data])
            assert await _read(dev, sector, ss) == data, f"round trip at sector {sector}"


async def check_buffer_lists(make: MakeDevice) -> None:
    async with fresh(make) as (dev, ss, _):
        chunks = [os.urandom(ss), os.urandom(3 * ss), os.urandom(2 * ss)]
        await dev.write(5, chunks)
        split = [bytearray(4 * ss), bytearray(ss), bytearray(ss)]
        await dev.read(5, split)
        assert b"".join(split) == b"".join(chunks), "a buffer list reads back in order"
        await dev.read(5, [])
        await dev.write(5, [])


class FillFailed(Exception):
    """What ``check_write_filled``'s failing fill raises."""


async def check_write_filled(make: MakeDevice) -> None:
    """``write_filled`` writes what the fill put in the buffer (at the start and the
    end of the device); a fill that raises propagates, unchanged (an ``OSError`` too:
    it is not the device's), and nothing is written."""
    async with fresh(make) as (dev, ss, size):
        for sector in (0, size - 8):
            data = os.urandom(8 * ss)
            put = functools.partial(_put, data=data)
            await dev.write_filled(sector, memoryview(bytearray(8 * ss)), put)
            assert await _read(dev, sector, 8 * ss) == data, f"write_filled at sector {sector}"
        before = await _read(dev, 16, 4 * ss)

        def failing(view: memoryview) -> None:
            view[:] = os.urandom(len(view))
            raise FillFailed("the fill failed")

        def lost(view: memoryview) -> None:
            raise ConnectionResetError(errno.ECONNRESET, "the fill's connection was reset")

        for fill, raised in ((failing, FillFailed), (lost, ConnectionResetError)):
            try:
                await dev.write_filled(16, memoryview(bytearray(4 * ss)), fill)
            except raised:
                pass  # as it was: an OSError of the fill's is not the device's
            else:
                raise AssertionError(f"write_filled did not raise its fill's {raised.__name__}")
            assert await _read(dev, 16, 4 * ss) == before, "a failed fill was written"


def _put(view: memoryview, data: bytes) -> None:
    view[:] = data


async def check_safe_rejects(make: MakeDevice) -> None:
    async with fresh(make) as (dev, ss, size):
        safe = SafeDevice(dev)
        before = await _read(dev, size - 2, 2 * ss)
        bad_requests = [
            (0, [bytearray(ss + 1)]),
            (size - 1, [bytearray(2 * ss)]),
            (size, [bytearray(ss)]),
            (-1, [bytearray(ss)]),
        ]
        for sector, buffers in bad_requests:
            for op in (safe.read, safe.write):
                try:
                    await op(sector, buffers)
                except Unsafe:
                    continue
                raise AssertionError(f"safe {op.__name__} at {sector} was not rejected")
        assert await _read(dev, size - 2, 2 * ss) == before, "a rejected write changed data"


async def check_read_only(make_ro: MakeDevice) -> None:
    """Every mutator of a read-only device is refused (``ReadOnly``, or ``Unimplemented``
    for a capability it lacks) and changes nothing."""
    dev = await make_ro()
    try:
        info = await dev.get_info()
        assert not info.read_write, "make_read_only_device gave a writable device"
        ss = info.sector_size
        before = await _read(dev, 0, 4 * ss)
        mutators: dict[str, Callable[[], Awaitable[None]]] = {
            "write": lambda: dev.write(0, [bytes(ss)]),
            "write_filled": lambda: dev.write_filled(0, memoryview(bytearray(ss)), _zero_fill),
            "discard": lambda: dev.discard(0, 1),
            "write_zeroes": lambda: dev.write_zeroes(0, 1),
            "resize": lambda: dev.resize(info.size_sectors + 8),
        }
        for name, call in mutators.items():
            try:
                await call()
            except ReadOnly:
                continue
            except Unimplemented:
                if name not in ("write", "write_filled"):
                    continue
            raise AssertionError(f"a read-only device accepted {name}")
        assert await _read(dev, 0, 4 * ss) == before, "a refused change changed data"
        assert (await dev.get_info()).size_sectors == info.size_sectors
    finally:
        await dev.aclose()


def _zero_fill(view: memoryview) -> None:
    view[:] = bytes(len(view))


async def check_flush_and_close(make: MakeDevice) -> None:
    async with fresh(make) as (dev, ss, _):
        await dev.write(0, [os.urandom(ss)])
        await dev.flush()
        await dev.aclose()
        await dev.aclose()
        for call in (dev.get_info(), dev.read(0, [bytearray(ss)]), dev.write(0, [bytes(ss)])):
            try:
                await call
            except Disconnected:
                continue
            raise AssertionError("I/O after aclose did not raise Disconnected")


async def check_concurrent(make: MakeDevice) -> None:
    async with fresh(make) as (dev, ss, size):
        tasks = min(32, size)
        expected = {i: os.urandom(ss) for i in range(tasks)}

        async def write_then_read(i: int) -> None:
            await dev.write(i, [expected[i]])
            assert await _read(dev, i, ss) == expected[i], f"concurrent round trip at {i}"

        async with trio.open_nursery() as nursery:
            for i in range(tasks):
                nursery.start_soon(write_then_read, i)


async def check_cancellation(make: MakeDevice) -> None:
    """A call cancelled in flight leaves the device usable, and a cancelled write's
    sectors read back as old or new data, sector by sector."""
    async with fresh(make) as (dev, ss, _):
        old, new = os.urandom(8 * ss), os.urandom(8 * ss)
        await dev.write(8, [old])
        for steps in range(4):  # cancel after 0, 1, 2, 3 scheduler passes
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dev.write, 8, [new])
                nursery.start_soon(_read, dev, 8, 8 * ss)
                for _ in range(steps):
                    await trio.lowlevel.checkpoint()
                nursery.cancel_scope.cancel()
            got = await _read(dev, 8, 8 * ss)
            for k in range(8):
                piece = got[k * ss : (k + 1) * ss]
                assert piece in (old[k * ss : (k + 1) * ss], new[k * ss : (k + 1) * ss]), (
                    f"sector {8 + k} after a cancelled write is neither old nor new"
                )
        data = os.urandom(ss)
        await dev.write(0, [data])
        assert await _read(dev, 0, ss) == data, "the device works after cancellations"


async def check_close_while_in_flight(make: MakeDevice) -> None:
    """``aclose`` while calls are in flight ends: each call succeeds or raises a
    ``BlockError``, and later calls raise ``Disconnected``."""
    async with fresh(make) as (dev, ss, _):
        leaked: list[BaseException] = []

        async def busy(sector: int) -> None:
            try:
                for _ in range(20):
                    await dev.write(sector, [os.urandom(ss)])
                    await _read(dev, sector, ss)
            except BlockError:
                pass
            except Exception as exc:
                leaked.append(exc)

        async with trio.open_nursery() as nursery:
            for sector in range(8):
                nursery.start_soon(busy, sector)
            await trio.lowlevel.checkpoint()
            await dev.aclose()
        assert not leaked, f"a call in flight at aclose raised {leaked[0]!r}"
        try:
            await dev.read(0, [bytearray(ss)])
        except Disconnected:
            pass
        else:
            raise AssertionError("a read after aclose did not raise Disconnected")


async def check_capabilities(make: MakeDevice) -> None:
    async with fresh(make) as (dev, ss, size):
        caps = dev.capabilities
        await dev.write(2, [os.urandom(4 * ss)])
        if Capability.WRITE_ZEROES in caps:
            await dev.write_zeroes(2, 2)
            assert await _read(dev, 2, 2 * ss) == bytes(2 * ss), "write_zeroes reads back zeroes"
        if Capability.EXTENTS in caps:
            extents = await dev.extents(0, size)
            assert extents and extents[0].sector == 0, "extents start where asked"
            for a, b in itertools.pairwise(extents):
                assert a.end == b.sector, "extents are contiguous"
        if Capability.RESIZE in caps:
            await dev.resize(size + 8)
            assert (await dev.get_info()).size_sectors == size + 8
            assert await _read(dev, size, 8 * ss) == bytes(8 * ss), "grown space reads as zeroes"
            await dev.resize(size)
            assert (await dev.get_info()).size_sectors == size
            try:
                await dev.resize(0)
            except Unsafe:
                assert (await dev.get_info()).size_sectors == size, (
                    "a refused resize changes nothing"
                )
            else:
                raise AssertionError("resize to 0 sectors did not raise Unsafe")
        for name, cap in [("discard", Capability.DISCARD), ("resize", Capability.RESIZE)]:
            if cap not in caps:
                try:
                    await (dev.discard(0, 1) if name == "discard" else dev.resize(size))
                except Unimplemented:
                    continue
                raise AssertionError(f"{name} without the capability did not raise Unimplemented")


CHECKS = [
    check_info,
    check_round_trip_at_edges,
    check_buffer_lists,
    check_write_filled,
    check_safe_rejects,
    check_flush_and_close,
    check_concurrent,
    check_cancellation,
    check_close_while_in_flight,
    check_capabilities,
]


async def check_block_device(
    make_device: MakeDevice, *, make_read_only_device: MakeDevice | None = None
) -> None:
    """Run every contract check against fresh devices from ``make_device``."""
    with trio.fail_after(60):
        for check in CHECKS:
            await check(make_device)
        if make_read_only_device is not None:
            await check_read_only(make_read_only_device)
