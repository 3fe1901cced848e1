"""Every device and wrapper passes the conformance suite; device-specific behaviour."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from blockfuse.block import BlockDevice
from blockfuse.devices import file as file_module
from blockfuse.devices.file import open_file
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.readonly import ReadOnlyDevice
from blockfuse.devices.safe import SafeDevice
from blockfuse.devices.sparse import open_sparse
from blockfuse.errors import Disconnected, ReadOnly, RequestFailed, Unsafe
from blockfuse.testing import Fault, FaultyDevice, check_block_device

SIZE = 1 << 20


async def make_memory() -> BlockDevice:
    return MemoryDevice(SIZE)


async def test_memory_conforms() -> None:
    async def make_ro() -> BlockDevice:
        return MemoryDevice(SIZE, read_only=True)

    await check_block_device(make_memory, make_read_only_device=make_ro)


async def test_memory_4k_sectors_conform() -> None:
    async def make() -> BlockDevice:
        return MemoryDevice(SIZE, sector_size=4096)

    await check_block_device(make)


def image(tmp_path: Path, size: int = SIZE) -> str:
    path = tmp_path / f"img{len(list(tmp_path.iterdir()))}"
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


async def test_file_conforms(tmp_path: Path) -> None:
    async def make() -> BlockDevice:
        return open_file(image(tmp_path))

    async def make_ro() -> BlockDevice:
        return open_file(image(tmp_path), read_only=True)

    await check_block_device(make, make_read_only_device=make_ro)


async def test_safe_conforms() -> None:
    async def make() -> BlockDevice:
        return SafeDevice(MemoryDevice(SIZE))

    await check_block_device(make)


async def test_faulty_without_faults_conforms() -> None:
    async def make() -> BlockDevice:
        return FaultyDevice(MemoryDevice(SIZE))

    await check_block_device(make)


async def test_read_only_wrapper_conforms() -> None:
    async def make_ro() -> BlockDevice:
        return ReadOnlyDevice(MemoryDevice(SIZE))

    await check_read_only_only(make_ro)


async def check_read_only_only(make_ro) -> None:  # type: ignore[no-untyped-def]
    from blockfuse.testing.conformance import check_read_only

    with trio.fail_after(10):
        await check_read_only(make_ro)


async def test_file_data_reaches_the_file(tmp_path: Path) -> None:
    path = image(tmp_path)
    dev = open_file(path)
    data = os.urandom(8192)
    with trio.fail_after(10):
        await dev.write(3, [data[:4096], data[4096:]])
        await dev.flush()
        await dev.aclose()
    assert Path(path).read_bytes()[3 * 512 : 3 * 512 + 8192] == data


async def test_file_large_concurrent_io(tmp_path: Path) -> None:
    """Many 256 KiB requests in flight at once, some served by threads."""
    path = image(tmp_path, 64 << 20)
    dev = open_file(path)
    chunk = 256 << 10
    blobs = {i: os.urandom(chunk) for i in range(64)}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i, blob in blobs.items():
                nursery.start_soon(dev.write, i * chunk // 512, [blob])
        for i, blob in blobs.items():
            buf = bytearray(chunk)
            await dev.read(i * chunk // 512, [buf])
            assert buf == blob
        await dev.aclose()


@pytest.mark.parametrize("opener", [open_file, open_sparse])
async def test_a_write_too_big_for_the_loop_goes_whole_in_pieces(
    tmp_path: Path, opener: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over 1 MiB goes to a thread, which writes a piece at a time (256 KiB here):
    buffers of odd sizes across the piece edges, at an odd sector, all land in order."""
    monkeypatch.setattr(file_module, "THREAD_WRITE_PIECE", 256 << 10)
    dev = opener(image(tmp_path, 8 << 20))
    data = [os.urandom(n) for n in (512, 300 * 512, 2 << 20, 1536, 1 << 20)]
    with trio.fail_after(10):
        await dev.write(3, data)
        back = [bytearray(len(d)) for d in data]
        await dev.read(3, back)
    assert back == data
    await dev.aclose()


@pytest.mark.parametrize("opener", [open_file, open_sparse])
async def test_more_buffers_than_one_syscall_takes(tmp_path: Path, opener: Any) -> None:
    """The contract allows any number of buffers; preadv/pwritev take 1024 at most."""
    dev = opener(image(tmp_path, 2 << 20))
    data = [os.urandom(512) for _ in range(1500)]
    with trio.fail_after(10):
        await dev.write(0, data)
        back = [bytearray(512) for _ in range(1500)]
        await dev.read(0, back)
    assert back == data
    await dev.aclose()


async def test_file_rejects_odd_size(tmp_path: Path) -> None:
    path = tmp_path / "odd"
    path.write_bytes(b"x" * 1000)
    with pytest.raises(ValueError, match="not a whole number of 512-byte sectors"):
        open_file(str(path))


async def test_file_rejects_directory(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        open_file(str(tmp_path))


async def test_file_read_only_refuses_writes(tmp_path: Path) -> None:
    dev = open_file(image(tmp_path), read_only=True)
    with trio.fail_after(5), pytest.raises(ReadOnly):
        await dev.write(0, [bytes(512)])
    await dev.aclose()


async def test_file_short_file_is_an_error(tmp_path: Path) -> None:
    """A file truncated behind the device's back gives EIO, not silent zeroes."""
    path = image(tmp_path)
    dev = open_file(path)
    os.truncate(path, 512)
    with trio.fail_after(5), pytest.raises(RequestFailed) as info:
        await dev.read(10, [bytearray(512)])
    assert info.value.errno == errno.EIO
    await dev.aclose()


async def test_file_close_waits_for_in_flight_io(tmp_path: Path) -> None:
    dev = open_file(image(tmp_path, 16 << 20))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(dev.write, i * 4096, [os.urandom(2 << 20)])
            await trio.lowlevel.checkpoint()
            nursery.start_soon(dev.aclose)
    with pytest.raises(Disconnected):
        await dev.read(0, [bytearray(512)])


@pytest.mark.parametrize(
    ("sector", "nbytes", "message"),
    [
        (0, 100, "buffer 1 of 1 is 100 bytes, not a whole number of 512-byte sectors"),
        (2048, 512, "start sector 2048 is outside the device (2048 sectors of 512 bytes)"),
        (2040, 16 * 512, "request of 16 sectors at sector 2040 runs 8 sectors past the end"),
    ],
)
async def test_safe_messages_name_the_numbers(sector: int, nbytes: int, message: str) -> None:
    safe = SafeDevice(MemoryDevice(SIZE))
    with trio.fail_after(5), pytest.raises(Unsafe, match=re.escape(message)):
        await safe.read(sector, [bytearray(nbytes)])


async def test_safe_unsafe_calls_bypass_checks() -> None:
    mem = MemoryDevice(SIZE)
    safe = SafeDevice(mem)
    with trio.fail_after(5):
        await safe.unsafe_write(0, [b"\x01" * 100])
    assert mem.data[:100] == b"\x01" * 100


async def test_faults_surface_and_run_out() -> None:
    fault = Fault("write", errno.ENOSPC, first=10, end=20, times=1)
    dev = FaultyDevice(MemoryDevice(SIZE), [fault])
    with trio.fail_after(5):
        await dev.write(0, [bytes(512)])
        with pytest.raises(RequestFailed) as info:
            await dev.write(8, [bytes(4 * 512)])
        assert info.value.errno == errno.ENOSPC
        await dev.write(8, [bytes(4 * 512)])
