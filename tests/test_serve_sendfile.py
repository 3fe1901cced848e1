"""Large READs of a file device sent straight from the file (``FileDevice.lend``, the
writer's ``os.sendfile``): the bytes stay right, in order with every other reply; a file
that fails under a send drops only that connection, and the client's retry gets an
error reply; a lent range keeps the descriptor open; TLS never sends from the file."""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from blockfuse.devices.file import open_file
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.mirror.opening import open_mirror
from blockfuse.devices.readonly import ReadOnlyDevice
from blockfuse.devices.safe import SafeDevice
from blockfuse.devices.sparse import open_sparse
from blockfuse.devices.wrapper import PassThrough
from blockfuse.errors import BlockError, RequestFailed
from blockfuse.filerange import FileRange
from blockfuse.nbd.uri import parse_uri
from blockfuse.sectors import DeviceBytes
from blockfuse.serve.requests import LEND_MIN, RequestHandler
from blockfuse.transport import writer
from blockfuse.transport.connect import connect_nbd
from blockfuse.transport.handshake import ConnectionLost
from blockfuse.transport.writer import MessageWriter

from .mirrorkit import Slow
from .mirrorkit import image as mirror_image
from .servekit import export_of, serving, wait_until
from .test_tls_serve import nbds, server_tls
from .tlscerts import Certificates, make_certificates

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(7).randbytes(SIZE))
    return path


@pytest.fixture
def sendfiles(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The byte counts the writer asked ``os.sendfile`` for, one per call."""
    calls: list[int] = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        calls.append(count)
        return real(out_fd, in_fd, offset, count)

    monkeypatch.setattr(writer.os, "sendfile", counting)
    yield calls


READS = [(0, LEND_MIN), (LEND_MIN, 4096), (512, MiB), (3 * MiB, 8 * MiB), (100, 3 * LEND_MIN),
         (SIZE - LEND_MIN, LEND_MIN), (4096, 4096), (SIZE - 2 * MiB, 2 * MiB)]  # fmt: skip
"""Offsets and lengths: lent (whole sectors, >= LEND_MIN) and not, among each other."""


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
async def test_large_reads_are_sent_from_the_file_in_order_with_the_rest(
    image: Path, short_tmp: Path, sendfiles: list[int], tcp: bool
) -> None:
    data = image.read_bytes()
    device = open_file(str(image))
    with trio.fail_after(60):
        async with serving([export_of(device)], short_tmp, tcp=tcp) as s, trio.open_nursery() as n:
            client = await s.client(n)

            async def check(offset: int, length: int) -> None:
                buf = memoryview(bytearray(length))
                await client.pread(buf, offset)
                assert buf == data[offset : offset + length], (offset, length)

            for _ in range(3):  # all in flight at once, replies in any order
                async with trio.open_nursery() as readers:
                    for offset, length in READS:
                        readers.start_soon(check, offset, length)
            writer_client = await s.client(n)  # a write acknowledged on another connection
            new = random.Random(8).randbytes(2 * MiB)
            await writer_client.pwrite(memoryview(new), 5 * MiB)
            data = data[: 5 * MiB] + new + data[7 * MiB :]
            await check(5 * MiB, 2 * MiB)  # is seen by a later READ sent from the file
            await client.aclose()
            await writer_client.aclose()
        await device.aclose()
    assert sendfiles, "no READ was sent from the file"


async def test_a_file_that_shrank_behind_the_device_answers_the_read_with_an_error(
    image: Path, short_tmp: Path, sendfiles: list[int]
) -> None:
    """Past the file's new end nothing is cached, so nothing is lent: the READ is read
    as usual and answered with the error, on a connection that lives on."""
    device = open_file(str(image))
    with trio.fail_after(60):
        async with serving([export_of(device)], short_tmp) as s, trio.open_nursery() as n:
            client = await s.client(n)
            os.truncate(image, MiB)
            with pytest.raises(RequestFailed, match="ended"):
                await client.pread(memoryview(bytearray(MiB)), 2 * MiB)
            buf = memoryview(bytearray(LEND_MIN))
            await client.pread(buf, 0)
            assert buf == image.read_bytes()[:LEND_MIN]
            await client.aclose()
        await device.aclose()
    assert sendfiles == [LEND_MIN]


async def test_a_read_error_under_a_send_drops_that_connection_only(
    image: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reply was begun (its header went), so the connection is dropped; the device
    lends no more, so the next connection's READ is read as usual (and would get an
    error as a reply, were the file still failing)."""
    data = image.read_bytes()
    calls: list[int] = []

    def failing(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        calls.append(count)
        raise OSError(errno.EIO, "Input/output error")

    device = open_file(str(image))
    with trio.fail_after(60):
        async with serving([export_of(device)], short_tmp) as s, trio.open_nursery() as n:
            other = await s.client(n)
            client = await s.client(n)
            monkeypatch.setattr(writer.os, "sendfile", failing)
            with pytest.raises(ConnectionLost):
                await client.pread(memoryview(bytearray(MiB)), 2 * MiB)
            assert calls == [MiB]
            retry = await s.client(n)
            buf = memoryview(bytearray(MiB))
            await retry.pread(buf, 2 * MiB)
            assert buf == data[2 * MiB : 3 * MiB] and calls == [MiB]
            await other.pread(buf, 0)  # the other connection lives on
            assert buf == data[:MiB]
            for c in (client, retry, other):
                await c.aclose()
        await device.aclose()


async def test_a_lent_range_keeps_the_file_open_until_it_is_released(image: Path) -> None:
    device = open_file(str(image))
    lent = device.lend(0, LEND_MIN // 512)
    assert lent is not None and lent.length == LEND_MIN
    inode = os.fstat(lent.fd).st_ino
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(device.aclose)
            await trio.testing.wait_all_tasks_blocked()
            assert os.fstat(lent.fd).st_ino == inode  # still open: a send may be under way
            lent.release()
    assert not fd_is(lent.fd, inode)  # closed (the number may be another file's by now)
    assert device.lend(0, 1) is None


def fd_is(fd: int, inode: int) -> bool:
    try:
        return os.fstat(fd).st_ino == inode
    except OSError:
        return False


async def test_a_range_not_all_in_the_page_cache_is_not_lent(image: Path) -> None:
    """The send reads the file in the event loop: from the disk it would stall it."""
    device = open_file(str(image))
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert device.lend(0, MiB // 512) is None
        os.pread(fd, MiB, 0)
        lent = device.lend(0, MiB // 512)
        assert lent is not None
        lent.release()
    finally:
        os.close(fd)
    await device.aclose()


async def test_a_sparse_device_lends_inside_its_backing_file_only(image: Path) -> None:
    """Past the backing file the device reads zeroes: nothing to send from there.  A lent
    range holds the gate shared, so a resize that would cut it off waits for it."""
    sparse = open_sparse(str(image), size_bytes=2 * SIZE)
    sectors = SIZE // 512
    assert sparse.lend(sectors - 8, 16) is None
    lent = sparse.lend(sectors - 8, 8)
    assert lent is not None
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(sparse.resize, sectors // 2)
            await trio.testing.wait_all_tasks_blocked()
            assert os.fstat(lent.fd).st_size == SIZE  # not cut yet
            assert sparse.lend(0, 8) is None  # a resize waits: nothing more is lent
            lent.release()
    assert os.fstat(sparse._fd).st_size == SIZE // 2
    again = sparse.lend(0, 8)
    assert again is not None
    again.release()
    await sparse.aclose()


async def test_a_lent_sparse_range_holds_up_no_other_io(image: Path) -> None:
    """A write that grows the backing file, and a read behind it, do not wait for a lent
    range (a client slow to read it would otherwise hold up the whole device)."""
    sparse = open_sparse(str(image), size_bytes=2 * SIZE)
    lent = sparse.lend(0, 8)
    assert lent is not None
    with trio.fail_after(5):
        await sparse.write(SIZE // 512 + 8, [b"g" * 4096])  # past the backing file: grows it
        buf = bytearray(4096)
        await sparse.read(0, [buf])
    assert os.fstat(lent.fd).st_size > SIZE
    lent.release()
    await sparse.aclose()


async def test_a_wrapper_keeps_its_device_from_lending(image: Path) -> None:
    inner = open_file(str(image))
    for device in (PassThrough(inner), ReadOnlyDevice(inner)):  # what they do to reads holds
        assert device.lend(0, 8) is None
    assert RequestHandler(DeviceBytes(SafeDevice(inner)), True, sends_files=True)._lender is inner
    assert RequestHandler(DeviceBytes(inner), True, sends_files=False)._lender is None
    await inner.aclose()


async def test_only_ranges_inside_the_device_are_lent(image: Path) -> None:
    device = open_file(str(image))
    sectors = SIZE // 512
    assert device.lend(sectors - 1, 2) is None
    assert device.lend(-1, 2) is None
    assert device.lend(0, 0) is None
    whole = device.lend(0, sectors)
    assert whole is not None and whole.length == SIZE
    whole.release()
    await device.aclose()


@pytest.mark.parametrize("error", [errno.EPIPE, errno.ETIMEDOUT, errno.ECONNRESET, errno.ENOMEM])
async def test_a_socket_error_under_a_send_keeps_the_lending(
    image: Path, error: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection is lost; the file is fine, and lends on."""

    def failing(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(writer.os, "sendfile", failing)
    device = open_file(str(image))
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out = MessageWriter(trio.SocketStream(a), a.fileno(), "test", timeout=10)
    lent = device.lend(0, 8)
    assert lent is not None
    with pytest.raises(ConnectionLost):
        await out.write([b"header", lent], lent.release)
    again = device.lend(0, 8)
    assert again is not None
    again.release()
    a.close()
    b.close()
    await device.aclose()


async def test_a_failed_send_stops_the_lending(image: Path) -> None:
    device = open_file(str(image))
    lent = device.lend(0, 8)
    assert lent is not None
    lent.failed(OSError(5, "Input/output error"))
    lent.release()
    assert device.lend(0, 8) is None
    await device.aclose()


def file_range(path: Path, offset: int, length: int) -> tuple[FileRange, list[str]]:
    fd = os.open(path, os.O_RDONLY)
    events: list[str] = []

    def release() -> None:
        events.append("released")
        os.close(fd)

    return FileRange(fd, offset, length, release, lambda exc: events.append("failed")), events


async def test_the_writer_sends_ranges_whole_and_in_order_when_the_socket_fills(
    image: Path,
) -> None:
    """A small send buffer: the range goes partly at once, the rest after waits."""
    data = image.read_bytes()
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    stream = trio.SocketStream(a)
    out = MessageWriter(stream, a.fileno(), "test", timeout=10)
    rng, events = file_range(image, 4096, 3 * MiB)
    head = bytes(MiB)  # more than the socket takes: a partial writev before the range
    parts = [head, rng, b"tail"]
    expected = head + data[4096 : 4096 + 3 * MiB] + b"tail" + b"next"
    got = bytearray()
    with trio.fail_after(30):
        async with trio.open_nursery() as n:

            async def receive() -> None:
                while len(got) < len(expected):
                    got.extend(await b.recv(1 << 16))

            n.start_soon(receive)
            await out.write(parts)
            await out.write([b"next"])
    assert got == expected
    rng.release()
    assert events == ["released"]
    await stream.aclose()
    b.close()


async def test_the_writer_reads_a_range_into_bytes_for_a_stream_that_is_not_a_socket(
    image: Path,
) -> None:
    data = image.read_bytes()
    left, right = trio.testing.memory_stream_pair()
    out = MessageWriter(left, None, "test", timeout=10)
    rng, _ = file_range(image, 0, 2 * LEND_MIN)
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(out.write, [b"h", rng])
            got = b""
            while len(got) < 1 + 2 * LEND_MIN:
                got += await right.receive_some()
    assert got == b"h" + data[: 2 * LEND_MIN]
    rng.release()


async def test_a_range_past_the_end_of_its_file_breaks_the_writer(image: Path) -> None:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = trio.SocketStream(a)
    out = MessageWriter(stream, a.fileno(), "test", timeout=10)
    rng, events = file_range(image, SIZE - 4096, 8192)
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(b.recv, 1 << 20)
            with pytest.raises(BlockError, match="READ reply"):
                await out.write([rng])
            n.cancel_scope.cancel()
    assert events == ["failed"]
    rng.release()
    await stream.aclose()
    b.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


async def test_over_tls_nothing_is_sent_from_the_file(
    image: Path, short_tmp: Path, certs: Certificates, sendfiles: list[int]
) -> None:
    data = image.read_bytes()
    device = open_file(str(image))
    with trio.fail_after(60):
        tls = server_tls(certs)
        async with serving([export_of(device)], short_tmp, tls=tls) as s, trio.open_nursery() as n:
            client = await connect_nbd(n, parse_uri(nbds(s, certs)))
            buf = memoryview(bytearray(2 * MiB))
            await client.pread(buf, MiB)
            assert buf == data[MiB : 3 * MiB]
            await client.aclose()
        await device.aclose()
    assert sendfiles == []


def raw_client(path: Path) -> socket.socket:
    """A fixed-newstyle client that opens export ``disk`` (NBD_OPT_EXPORT_NAME) and
    reads nothing more: what a test needs to leave replies unread."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(str(path))
    sock.recv(18, socket.MSG_WAITALL)
    sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 4) + b"disk")
    assert len(sock.recv(10, socket.MSG_WAITALL)) == 10
    return sock


@pytest.mark.parametrize("ending", ["client resets", "server hurries"])
async def test_lent_replies_left_unread_are_released(
    image: Path, short_tmp: Path, sendfiles: list[int], ending: str
) -> None:
    """Lent READs whose replies the client never reads: once the connection ends (the
    client goes, or the server's shutdown cuts the writes off), every range is given
    back, so the device closes."""
    device = open_file(str(image))
    with trio.fail_after(60):
        async with serving([export_of(device)], short_tmp, grace=0.5) as s:
            sock = await trio.to_thread.run_sync(raw_client, Path(s.address.path or ""))
            for cookie in range(8):
                sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, cookie, 0, 4 * MiB))
            await wait_until(lambda: bool(sendfiles))
            if ending == "client resets":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
        await device.aclose()  # waits for every lent range
        if ending != "client resets":
            sock.close()


async def test_a_mirror_lends_from_its_secondary_where_it_reads_from_it(
    image: Path, tmp_path: Path, short_tmp: Path, sendfiles: list[int]
) -> None:
    """While copying, reads go to the primary: nothing is lent.  Synced (the range
    copied) and pivoted, reads come from the secondary: its file's range is lent, and a
    READ served from the mirror is sent from it."""
    data = image.read_bytes()
    primary = MemoryDevice(SIZE)
    await primary.write(0, [data])
    secondary = open_file(mirror_image(tmp_path, "secondary.img", SIZE))
    sectors = LEND_MIN // 512
    with trio.fail_after(60):
        async with open_mirror(Slow(primary, 0.05), secondary, chunk=64 << 10) as m:
            assert m.lend(0, sectors) is None  # copying: a read would go to the primary
            m._primary.dev.delay = 0
            await m.wait_synced()
            Path(secondary.path).read_bytes()  # the copy's write-behind may have dropped it
            lent = m.lend(0, sectors)
            assert lent is not None and os.fstat(lent.fd).st_ino == os.stat(secondary.path).st_ino
            lent.release()
            async with serving([export_of(m)], short_tmp) as s, trio.open_nursery() as n:
                client = await s.client(n)
                buf = memoryview(bytearray(4 * MiB))
                await client.pread(buf, MiB)
                assert buf == data[MiB : 5 * MiB] and sendfiles
                await m.pivot()
                sendfiles.clear()
                await client.pread(buf, 2 * MiB)
                assert buf == data[2 * MiB : 6 * MiB] and sendfiles
                await client.aclose()
    await secondary.aclose()
