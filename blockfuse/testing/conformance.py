"""The block contract as a test suite any device or stack can run.

    async def test_memory_conforms():
        await check_block_device(lambda: make_memory())

``make_device`` is an async callable returning a fresh, writable device of at least 64
sectors; ``make_read_only_device`` (optional) one that refuses writes.  Every check
closes what it opened.  A failed check raises ``AssertionError`` naming the check.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Callable

import trio

from ..block import BlockDevice, Capability
from ..devices.safe import SafeDevice
from ..errors import Disconnected, ReadOnly, Unimplemented, Unsafe

MakeDevice = Callable[[], Awaitable[BlockDevice]]
MIN_SECTORS = 64


async def _fresh(make: MakeDevice) -> tuple[BlockDevice, int, int]:
    dev = await make()
    info = await dev.get_info()
    assert info.size_sectors >= MIN_SECTORS, f"device too small ({info.size_sectors} sectors)"
    return dev, info.sector_size, info.size_sectors


async def _read(dev: BlockDevice, sector: int, nbytes: int) -> bytes:
    buf = bytearray(nbytes)
    await dev.read(sector, [buf])
    return bytes(buf)


async def check_info(make: MakeDevice) -> None:
    dev, ss, _ = await _fresh(make)
    info = await dev.get_info()
    assert info.read_write, "make_device must give a writable device"
    assert ss > 0 and ss % 512 == 0, f"odd sector size {ss}"
    await dev.aclose()


async def check_round_trip_at_edges(make: MakeDevice) -> None:
    dev, ss, size = await _fresh(make)
    for sector in (0, 1, size // 2, size - 1):
        data = os.urandom(ss)
        await dev.write(sector, [data])
        assert await _read(dev, sector, ss) == data, f"round trip at sector {sector}"
    await dev.aclose()


async def check_buffer_lists(make: MakeDevice) -> None:
    dev, ss, _ = await _fresh(make)
    chunks = [os.urandom(ss), os.urandom(3 * ss), os.urandom(2 * ss)]
    await dev.write(5, chunks)
    split = [bytearray(4 * ss), bytearray(ss), bytearray(ss)]
    await dev.read(5, split)
    assert b"".join(split) == b"".join(chunks), "a buffer list reads back in order"
    await dev.read(5, [])
    await dev.write(5, [])
    await dev.aclose()


async def check_safe_rejects(make: MakeDevice) -> None:
    dev, ss, size = await _fresh(make)
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
    await safe.aclose()


async def check_read_only(make_ro: MakeDevice) -> None:
    dev = await make_ro()
    info = await dev.get_info()
    assert not info.read_write, "make_read_only_device gave a writable device"
    before = await _read(dev, 0, info.sector_size)
    try:
        await dev.write(0, [bytes(info.sector_size)])
    except ReadOnly:
        pass
    else:
        raise AssertionError("a read-only device accepted a write")
    assert await _read(dev, 0, info.sector_size) == before
    await dev.aclose()


async def check_flush_and_close(make: MakeDevice) -> None:
    dev, ss, _ = await _fresh(make)
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
    dev, ss, size = await _fresh(make)
    tasks = min(32, size)
    expected = {i: os.urandom(ss) for i in range(tasks)}

    async def write_then_read(i: int) -> None:
        await dev.write(i, [expected[i]])
        assert await _read(dev, i, ss) == expected[i], f"concurrent round trip at {i}"

    async with trio.open_nursery() as nursery:
        for i in range(tasks):
            nursery.start_soon(write_then_read, i)
    await dev.aclose()


async def check_capabilities(make: MakeDevice) -> None:
    dev, ss, size = await _fresh(make)
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
    for name, cap in [("discard", Capability.DISCARD), ("resize", Capability.RESIZE)]:
        if cap not in caps:
            try:
                await (dev.discard(0, 1) if name == "discard" else dev.resize(size))
            except Unimplemented:
                continue
            raise AssertionError(f"{name} without the capability did not raise Unimplemented")
    await dev.aclose()


CHECKS = [
    check_info,
    check_round_trip_at_edges,
    check_buffer_lists,
    check_safe_rejects,
    check_flush_and_close,
    check_concurrent,
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
