"""Large WRITEs to a raw file written from the socket straight into it (``splice.py``):
the bytes land, the sectors are held against other writes meanwhile, and a client that
vanishes or stalls mid-payload, a file that refuses the bytes, or a socket that cannot be
spliced from loses nothing and hangs nothing."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from blockfuse.devices.file import open_file
from blockfuse.devices.safe import SafeDevice
from blockfuse.devices.sparse import open_sparse
from blockfuse.errors import RequestFailed
from blockfuse.nbd import constants as c
from blockfuse.nbd.events import Request
from blockfuse.sectors import DeviceBytes
from blockfuse.serve.requests import RequestHandler
from blockfuse.transport import splice
from blockfuse.transport.connection import Limits

from .conftest import small_tmpfs_at
from .hostile_client import RawClient, request
from .servekit import SIZE, Served, export_of, file_device, serving, wait_until
from .timing import time_limit

MiB = 1 << 20
BIG = 256 << 10
limit = time_limit(60)


@pytest.fixture
def moves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every payload the server spliced (its ``move`` calls)."""
    seen: list[int] = []
    move = splice.PayloadSplicer.move

    async def counted(self: splice.PayloadSplicer, core, into, wait):  # type: ignore[no-untyped-def]
        seen.append(into.length)
        return await move(self, core, into, wait)

    monkeypatch.setattr(splice.PayloadSplicer, "move", counted)
    return seen


async def test_a_large_write_goes_from_the_socket_into_the_file(
    nursery: trio.Nursery, short_tmp: Path, moves: list[int]
) -> None:
    image = short_tmp / "disk.img"
    data = random.Random(1).randbytes(MiB)
    async with file_device(image) as dev, serving([export_of(dev)], short_tmp) as s:
        client = await s.client(nursery)
        await client.pwrite(memoryview(data[:4096]), 2 * MiB)  # small: received as usual
        await client.pwrite(memoryview(data), 512)
        back = bytearray(MiB)
        await client.pread(memoryview(back), 512)
        await client.aclose()
    assert bytes(back) == data
    on_disk = image.read_bytes()
    assert on_disk[512 : 512 + MiB] == data and on_disk[2 * MiB : 2 * MiB + 4096] == data[:4096]
    assert moves == [MiB]


async def first_write_through(bytes_: DeviceBytes) -> None:
    """A small write, by which a file device finds out that the file refuses
    ``RWF_NOWAIT`` (before that it lends no range to write into)."""
    await bytes_.write(SIZE - 4096, bytes(4096))


async def test_a_file_lends_no_range_to_write_into_before_a_write_tried_rwf_nowait(
    tmp_path: Path,
) -> None:
    async with file_device(tmp_path / "disk.img") as dev:
        bytes_ = DeviceBytes(dev)
        assert await bytes_.lend_writable(0, BIG) is None
        await first_write_through(bytes_)
        lent = await bytes_.lend_writable(0, BIG)
        assert lent is not None
        lent.release()


async def test_each_write_into_the_target_takes_turns_with_other_writers(
    tmp_path: Path,
) -> None:
    """A target lent holds nothing by itself (a payload on its way does not hold other
    writers back); each write into it waits for a writer that holds its sectors (a
    read-modify-write), and holds them while it runs."""
    image = tmp_path / "disk.img"
    async with file_device(image) as dev:
        bytes_ = DeviceBytes(SafeDevice(dev))
        await first_write_through(bytes_)
        handler = RequestHandler(bytes_, structured=True, sends_files=True)
        target = await handler.write_target(Request(1, c.Cmd.WRITE, 0, 0, BIG))
        assert target is not None and (target.offset, target.length) == (0, BIG)
        assert bytes_.write_now(BIG, memoryview(b"n" * 4096)), "the lent range held sectors"
        order: list[str] = []
        held, let_go = trio.Event(), trio.Event()

        async def holder() -> None:
            async with bytes_.holding(7, 9):  # a read-modify-write of sectors 7-8
                held.set()
                await let_go.wait()
                order.append("holder")

        async def write_sectors_0_to_7() -> None:
            assert target.hold_now(0, 4096) is None, "the holder has sectors 7-8"
            hold = await target.hold(0, 4096)
            try:
                assert not bytes_.write_now(0, memoryview(b"x" * 512)), "not held while it runs"
                order.append("target")
                os.pwrite(target.fd, b"s" * 4096, 0)
            finally:
                target.unhold(hold)
            stayed = "its sectors stayed held after it"
            assert bytes_.write_now(4096, memoryview(b"y" * 512)), stayed

        with trio.fail_after(5):
            async with trio.open_nursery() as tasks:
                tasks.start_soon(holder)
                await held.wait()
                tasks.start_soon(write_sectors_0_to_7)
                await trio.testing.wait_all_tasks_blocked()
                assert order == [], "the write did not wait for the holder"
                let_go.set()
        target.release()
        assert order == ["holder", "target"]
        assert image.read_bytes()[:4096] == b"s" * 4096


@pytest.mark.parametrize(
    ("flags", "sends_files", "read_only", "why"),
    [
        (c.CmdFlag.FUA, True, False, "FUA: the flush is awaited"),
        (0, False, False, "the connection cannot splice (TLS)"),
        (0, True, True, "a read-only file"),
    ],
)
async def test_no_write_target_where_a_write_must_go_through_the_device(
    tmp_path: Path, flags: int, sends_files: bool, read_only: bool, why: str
) -> None:
    async with file_device(tmp_path / "disk.img", read_only=read_only) as dev:
        bytes_ = DeviceBytes(dev)
        if not read_only:
            await first_write_through(bytes_)
        handler = RequestHandler(bytes_, structured=True, sends_files=sends_files)
        assert await handler.write_target(Request(1, c.Cmd.WRITE, flags, 0, BIG)) is None, why


async def test_no_write_target_on_a_sparse_image(tmp_path: Path) -> None:
    sparse = open_sparse(str(tmp_path / "s.img"), size_bytes=SIZE)
    try:
        handler = RequestHandler(DeviceBytes(sparse), structured=True, sends_files=True)
        assert await handler.write_target(Request(1, c.Cmd.WRITE, 0, 0, BIG)) is None
    finally:
        await sparse.aclose()


async def first_write(served: Served, nursery: trio.Nursery) -> None:
    """``first_write_through`` over NBD."""
    client = await served.client(nursery)
    await client.pwrite(memoryview(bytes(4096)), SIZE - 4096)
    await client.aclose()


async def half_a_write(raw: RawClient, offset: int) -> None:
    await raw.go(structured=False)
    await raw.send(request(c.Cmd.WRITE, offset, BIG) + b"h" * (BIG // 2))


async def test_a_client_that_vanishes_mid_payload_leaves_its_sectors_free(
    nursery: trio.Nursery, short_tmp: Path, moves: list[int]
) -> None:
    image = short_tmp / "disk.img"
    async with file_device(image) as dev, serving([export_of(dev)], short_tmp) as s:
        await first_write(s, nursery)
        async with await RawClient.connect(str(s.address.path)) as raw:
            await half_a_write(raw, 0)
            await wait_until(lambda: bool(moves))
        client = await s.client(nursery)
        with trio.fail_after(10):  # the range lock was given back
            await client.pwrite(memoryview(b"n" * 4096), 1000)
        await client.aclose()


async def test_a_stalled_payload_drops_its_connection_and_frees_its_sectors(
    nursery: trio.Nursery, short_tmp: Path, moves: list[int]
) -> None:
    limits = Limits(payload_timeout=0.5)
    async with (
        file_device(short_tmp / "disk.img") as dev,
        serving([export_of(dev)], short_tmp, limits=limits) as s,
    ):
        await first_write(s, nursery)
        async with await RawClient.connect(str(s.address.path)) as raw:
            await half_a_write(raw, 0)
            assert await raw.closed(within=10), "a client that stalled mid-payload was kept"
        assert moves == [BIG]
        client = await s.client(nursery)
        with trio.fail_after(10):
            await client.pwrite(memoryview(b"n" * 4096), 1000)
        await client.aclose()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, to fill."""
    with small_tmpfs_at(tmp_path / "small", "1M") as where:
        yield where


async def test_a_write_the_file_refuses_gets_its_error_and_the_stream_stays_in_step(
    nursery: trio.Nursery, short_tmp: Path, small_tmpfs: Path, moves: list[int]
) -> None:
    """A sparse raw file on a full filesystem: ENOSPC, the rest of the payload is still
    read, and the next request on the connection is answered."""
    image = small_tmpfs / "disk.img"
    with open(image, "wb") as f:
        f.truncate(4 * MiB)
    dev = open_file(str(image), read_only=False)
    export = export_of(dev)
    try:
        async with serving([export], short_tmp) as s:
            await first_write(s, nursery)
            client = await s.client(nursery)
            with pytest.raises(RequestFailed) as failed:
                await client.pwrite(memoryview(b"f" * (2 * MiB)), 0)
            assert failed.value.errno == errno.ENOSPC
            back = bytearray(4096)
            await client.pread(memoryview(back), 3 * MiB)
            assert bytes(back) == bytes(4096)
            await client.aclose()
            assert export.bytes.io_errors == 1
    finally:
        await dev.aclose()
    assert moves == [2 * MiB]


def refuse_splices(monkeypatch: pytest.MonkeyPatch, *, into_files: bool) -> list[int]:
    """``os.splice`` answers ``EINVAL`` into files (pipe -> file) or from sockets (socket
    -> pipe), as a kernel that cannot would; the length of each call refused."""
    real_splice = os.splice
    refused: list[int] = []

    def refusing(src: int, dst: int, count: int, **kw: int) -> int:
        if ("offset_dst" in kw) == into_files:
            refused.append(count)
            raise OSError(errno.EINVAL, "not here")
        return real_splice(src, dst, count, **kw)

    monkeypatch.setattr(os, "splice", refusing)
    return refused


async def two_writes_land(served: Served, nursery: trio.Nursery, image: Path, seed: int) -> None:
    """Two 1 MiB WRITEs, one after another, and both on the disk."""
    data = random.Random(seed).randbytes(MiB)
    await first_write(served, nursery)
    client = await served.client(nursery)
    await client.pwrite(memoryview(data), 0)
    await client.pwrite(memoryview(data[::-1]), MiB)
    await client.aclose()
    assert image.read_bytes()[: 2 * MiB] == data + data[::-1]


async def test_a_socket_that_cannot_be_spliced_from_is_read_into_a_buffer(
    nursery: trio.Nursery, short_tmp: Path, monkeypatch: pytest.MonkeyPatch, moves: list[int]
) -> None:
    refused = refuse_splices(monkeypatch, into_files=False)
    image = short_tmp / "disk.img"
    async with file_device(image) as dev, serving([export_of(dev)], short_tmp) as s:
        await two_writes_land(s, nursery, image, 2)
    assert moves == [MiB, MiB] and len(refused) == 1, "asked again after EINVAL"


async def test_a_file_that_refuses_splices_is_written_from_a_buffer(
    nursery: trio.Nursery,
    short_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    moves: list[int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A file whose filesystem takes no splice into it (``EINVAL``: no ``splice_write``):
    the WRITE still lands, from the bytes read out of the pipe, and the device lends no
    more ranges to write into, so the next WRITE is received as usual."""
    refused = refuse_splices(monkeypatch, into_files=True)
    image = short_tmp / "disk.img"
    async with file_device(image) as dev, serving([export_of(dev)], short_tmp) as s:
        await two_writes_land(s, nursery, image, 3)
    assert moves == [MiB] and len(refused) == 1, "lent a range to splice into again"
    assert "received into memory from now on" in caplog.text


async def test_writes_sent_one_after_another_are_all_answered(
    nursery: trio.Nursery, short_tmp: Path, moves: list[int]
) -> None:
    """The event after a spliced payload may be the next WRITE's header."""
    image = short_tmp / "disk.img"
    size = 64 << 10
    async with file_device(image) as dev, serving([export_of(dev)], short_tmp) as s:
        await first_write(s, nursery)
        async with await RawClient.connect(str(s.address.path)) as raw:
            await raw.go(structured=False)
            await raw.send(
                request(c.Cmd.WRITE, 0, size, cookie=1)
                + b"a" * size
                + request(c.Cmd.WRITE, size, size, cookie=2)
                + b"b" * size
                + request(c.Cmd.WRITE, 2 * size, 4096, cookie=3)
                + b"c" * 4096
            )
            replies = {await raw.simple_reply() for _ in range(3)}
    assert replies == {(0, 1), (0, 2), (0, 3)}
    assert image.read_bytes()[: 2 * size + 4096] == b"a" * size + b"b" * size + b"c" * 4096
    assert moves


async def test_a_stalled_payload_holds_no_sectors_against_other_writers(
    nursery: trio.Nursery, short_tmp: Path, moves: list[int]
) -> None:
    """Another front end's write (a FUSE write through the same bridge) of sectors a
    payload still on its way goes to does not wait for it."""
    async with file_device(short_tmp / "disk.img") as dev:
        export = export_of(dev)
        async with serving([export], short_tmp, limits=Limits(payload_timeout=30)) as s:
            await first_write(s, nursery)
            async with await RawClient.connect(str(s.address.path)) as raw:
                await half_a_write(raw, 0)
                await wait_until(lambda: bool(moves))
                with trio.fail_after(5):
                    await export.bytes.write(1000, b"f" * 4096)
                    assert export.bytes.write_now(8192, memoryview(b"g" * 4096))
