"""Our NBD client against real servers: nbdkit, qemu-nbd and nbd-server."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from blockfuse.block import BlockDevice, Capability
from blockfuse.devices.remote import RemoteDevice, open_remote
from blockfuse.errors import ProtocolError, ReadOnly, RequestFailed
from blockfuse.nbd.uri import parse_uri
from blockfuse.testing import check_block_device
from blockfuse.transport.connect import list_exports, open_nbd_client
from blockfuse.transport.handshake import HandshakeRefused

from .conftest import Start, require_tool
from .nbdpeers import DaemonPeer

pytestmark = pytest.mark.interop


async def remote(nursery: trio.Nursery, uri: str, **kw: float) -> RemoteDevice:
    with trio.fail_after(10):
        return await open_remote(nursery, parse_uri(uri), **kw)  # type: ignore[arg-type]


def sparse_image(path: Path, size: int, *data: tuple[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, blob in data:
            f.seek(offset)
            f.write(blob)
    return path


# --- nbdkit -------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
async def test_nbdkit_memory_conforms(nursery: trio.Nursery, start: Start, tcp: bool) -> None:
    rw = start(["nbdkit", "-f", "-U", "{sock}", "memory", "4M"], tcp=tcp)
    dev = await remote(nursery, rw.uri())
    assert dev.capabilities == {Capability.DISCARD, Capability.WRITE_ZEROES, Capability.EXTENTS}
    await dev.aclose()

    async def make() -> BlockDevice:
        return await remote(nursery, rw.uri())

    await check_block_device(make)


async def test_client_api_on_nbdkit(start: Start) -> None:
    peer = start(["nbdkit", "-f", "-U", "{sock}", "memory", "8M"])
    with trio.fail_after(10):
        async with open_nbd_client(parse_uri(peer.uri())) as client:
            data = os.urandom(1 << 20)
            await client.pwrite(memoryview(data), 1 << 20, fua=True)
            await client.flush()
            assert await client.block_status(0, 8 << 20) == [
                (1 << 20, 3),
                (1 << 20, 0),
                (6 << 20, 3),
            ]
            await client.zero(1 << 20, 4096)
            await client.trim(2 << 20, 4096)
            buf = bytearray(8192)
            await client.pread(memoryview(buf), 1 << 20)
            assert buf == bytes(4096) + data[4096:8192]


@pytest.mark.parametrize(
    ("option", "structured"),
    [("--no-sr", False), ("--mask-handshake=0", False), ("--mask-handshake=1", True)],
)
async def test_nbdkit_handshake_variants(
    nursery: trio.Nursery, start: Start, option: str, structured: bool
) -> None:
    """Simple replies only; non-fixed newstyle (EXPORT_NAME); no NO_ZEROES (124 zeroes)."""
    peer = start(["nbdkit", "-f", option, "-U", "{sock}", "memory", "4M"])
    dev = await remote(nursery, peer.uri())
    assert dev._link.client._tx.structured is structured
    data = os.urandom(64 << 10)
    buf = bytearray(len(data))
    with trio.fail_after(10):
        await dev.write(16, [data])
        await dev.read(16, [buf])
    assert buf == data
    await dev.aclose()


async def test_nbdkit_oldstyle_is_refused_clearly(nursery: trio.Nursery, start: Start) -> None:
    peer = start(["nbdkit", "-f", "--oldstyle", "memory", "1M"], tcp=True)
    with pytest.raises(ProtocolError, match="obsolete oldstyle handshake"):
        await remote(nursery, peer.uri())


async def test_nbdkit_read_only(nursery: trio.Nursery, start: Start) -> None:
    peer = start(
        ["nbdkit", "-f", "-r", "-U", "{sock}", "data", '"hello" @1048576 "world"', "size=2M"]
    )
    dev = await remote(nursery, peer.uri())
    info = await dev.get_info()
    assert not info.read_write and info.size_bytes == 2 << 20
    with pytest.raises(ReadOnly):
        await dev.write(0, [bytes(512)])
    buf = bytearray(512)
    with trio.fail_after(5):
        await dev.read(2048, [buf])
    assert buf[:5] == b"world"
    await dev.aclose()


async def test_nbdkit_lists_several_exports(short_tmp: Path, start: Start) -> None:
    exports = short_tmp / "exports"
    exports.mkdir()
    for name, size in [("alpha", 1 << 20), ("beta", 2 << 20), ("gamma", 512 << 10)]:
        sparse_image(exports / name, size, (0, name.encode()))
    peer = start(["nbdkit", "-f", "-U", "{sock}", "file", f"dir={exports}"])
    with trio.fail_after(10):
        found = await list_exports(parse_uri(peer.uri()))
    assert sorted((e.name, e.size) for e in found) == [
        ("alpha", 1 << 20),
        ("beta", 2 << 20),
        ("gamma", 512 << 10),
    ]
    out = subprocess.run(
        [sys.executable, "-m", "blockfuse.cli", "ls", peer.uri()],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == [
        "alpha\t1 MiB\t",
        "beta\t2 MiB\t",
        "gamma\t512 KiB\t",
    ]


async def test_nbdkit_exports_by_name(nursery: trio.Nursery, short_tmp: Path, start: Start) -> None:
    exports = short_tmp / "exports"
    exports.mkdir()
    for name in ("one", "two"):
        sparse_image(exports / name, 1 << 20, (0, name.encode() * 100))
    peer = start(["nbdkit", "-f", "-U", "{sock}", "file", f"dir={exports}"])
    for name in ("one", "two"):
        dev = await remote(nursery, peer.uri(name))
        buf = bytearray(512)
        with trio.fail_after(5):
            await dev.read(0, [buf])
        assert buf.startswith(name.encode() * 10)
        await dev.aclose()
    with pytest.raises(HandshakeRefused, match="has no export named 'nope'") as info:
        await remote(nursery, peer.uri("nope"))
    assert info.value.errno == errno.ENOENT


async def test_nbdkit_list_refused(start: Start) -> None:
    peer = start(
        [
            "nbdkit",
            "-f",
            "-U",
            "{sock}",
            "--filter=exportname",
            "memory",
            "1M",
            "exportname-list=error",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-m", "blockfuse.cli", "ls", peer.uri()],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().endswith("does not support listing exports (NBD_REP_ERR_PLATFORM)")
    assert len(out.stderr.strip().splitlines()) == 1


async def test_nbdkit_injected_errors_keep_the_connection(
    nursery: trio.Nursery, short_tmp: Path, start: Start
) -> None:
    inject = short_tmp / "inject"
    peer = start(
        [
            "nbdkit",
            "-f",
            "-U",
            "{sock}",
            "--filter=error",
            "memory",
            "4M",
            "error-pread=EIO",
            "error-pread-rate=100%",
            f"error-pread-file={inject}",
            "error-pwrite=ENOSPC",
            "error-pwrite-rate=100%",
            f"error-pwrite-file={inject}",
        ]
    )
    dev = await remote(nursery, peer.uri())
    with trio.fail_after(10):
        await dev.write(0, [b"x" * 4096])
        inject.touch()
        with pytest.raises(RequestFailed) as info:
            await dev.read(0, [bytearray(4096)])
        assert info.value.errno == errno.EIO
        with pytest.raises(RequestFailed) as info:
            await dev.write(0, [bytes(4096)])
        assert info.value.errno == errno.ENOSPC
        inject.unlink()
        buf = bytearray(4096)
        await dev.read(0, [buf])
    assert buf == b"x" * 4096
    assert dev.status()["reconnects"] == "0" and dev.status()["connection"] == "connected"
    await dev.aclose()


async def test_nbdkit_slow_replies_are_pipelined(nursery: trio.Nursery, start: Start) -> None:
    peer = start(
        ["nbdkit", "-f", "-U", "{sock}", "--filter=delay", "memory", "4M", "delay-read=500ms"]
    )
    dev = await remote(nursery, peer.uri())
    start_time = trio.current_time()
    with trio.fail_after(8):
        async with trio.open_nursery() as inner:
            for i in range(32):
                inner.start_soon(dev.read, i * 8, [bytearray(4096)])
    # nbdkit serves 16 requests at a time: ~1 s pipelined, 16 s one by one
    assert trio.current_time() - start_time < 4
    await dev.aclose()


async def test_nbdkit_small_max_block_size_splits(nursery: trio.Nursery, start: Start) -> None:
    peer = start(
        [
            "nbdkit",
            "-f",
            "-U",
            "{sock}",
            "--filter=blocksize-policy",
            "memory",
            "16M",
            "blocksize-minimum=512",
            "blocksize-preferred=4096",
            "blocksize-maximum=64K",
            "blocksize-error-policy=error",
        ]
    )
    dev = await remote(nursery, peer.uri())
    data = os.urandom(3 << 20)
    buf = bytearray(len(data))
    with trio.fail_after(20):
        await dev.write(8, [data])
        await dev.read(8, [buf])
    assert buf == data
    await dev.aclose()


async def test_server_restart_is_survived(
    nursery: trio.Nursery, short_tmp: Path, start: Start
) -> None:
    image = sparse_image(short_tmp / "disk.img", 4 << 20, (4096, b"kept" * 128))
    argv = ["nbdkit", "-f", "-U", "{sock}", "file", str(image)]
    peer = start(argv)
    dev = await remote(nursery, peer.uri(), backoff=0.2)
    peer.proc.kill()
    peer.proc.wait()
    os.unlink(peer.path or "")
    buf = bytearray(512)
    with trio.fail_after(15):
        async with trio.open_nursery() as inner:
            inner.start_soon(dev.read, 8, [buf])
            await trio.sleep(0.5)
            start(argv)
    assert buf == b"kept" * 128
    assert dev.status()["reconnects"] == "1"
    await dev.aclose()


async def test_nbdkit_shutdown_gets_disc_then_reconnect(
    nursery: trio.Nursery, short_tmp: Path, start: Start
) -> None:
    image = sparse_image(short_tmp / "disk.img", 4 << 20, (0, b"data" * 128))
    slow = ["nbdkit", "-f", "-U", "{sock}", "--filter=delay", "file", str(image), "rdelay=2"]
    peer = start(slow)
    dev = await remote(nursery, peer.uri(), backoff=0.2)
    buf = bytearray(512)
    with trio.fail_after(20):
        async with trio.open_nursery() as inner:
            inner.start_soon(dev.read, 0, [buf])
            await trio.sleep(0.5)
            peer.proc.terminate()  # nbdkit answers ESHUTDOWN, then waits for our DISC
            await trio.to_thread.run_sync(peer.proc.wait, 10)
            os.unlink(peer.path or "")
            start(["nbdkit", "-f", "-U", "{sock}", "file", str(image)])
    assert buf == b"data" * 128
    assert dev.status()["reconnects"] == "1"
    await dev.aclose()


async def test_nbdkit_slower_than_the_timeout_fails_the_read_then_reconnects(
    nursery: trio.Nursery, start: Start
) -> None:
    """Reads delayed 40 s (a SIGKILLed dd behind a mount once lived 41 s): with timeout=1
    the read fails with ETIMEDOUT after about a second, the connection is dropped, and a
    write goes through on a new one."""
    peer = start(["nbdkit", "-f", "-U", "{sock}", "--filter=delay", "memory", "4M", "rdelay=40"])
    with trio.fail_after(10):
        dev = await open_remote(nursery, parse_uri(peer.uri()), request_timeout=1)
    started = trio.current_time()
    with trio.fail_after(10), pytest.raises(RequestFailed) as info:
        await dev.read(0, [bytearray(4096)])
    assert info.value.errno == errno.ETIMEDOUT
    assert 1 <= trio.current_time() - started < 5
    with trio.fail_after(5):  # the request's own deadline passes a moment after the read's
        await dev._link.client._reader_done.wait()
    assert dev.status()["connection"].startswith("disconnected; last: read of 4096 bytes at 0")
    with trio.fail_after(10):
        await dev.write(0, [bytes(4096)])
    assert dev.status()["reconnects"] == "1"
    await dev.aclose()


async def test_nbdkit_paused_times_out_and_resumed_serves(
    nursery: trio.Nursery, short_tmp: Path, start: Start
) -> None:
    control = short_tmp / "pause.sock"
    peer = start(
        ["nbdkit", "-f", "-U", "{sock}", "--filter=pause", "memory", "4M",
         f"pause-control={control}"]
    )  # fmt: skip
    with trio.fail_after(10):
        dev = await open_remote(nursery, parse_uri(peer.uri()), request_timeout=1)
        await dev.write(0, [b"p" * 4096])
        pause = await trio.open_unix_socket(str(control))
        await pause.send_all(b"p")
        assert await pause.receive_some(1) == b"P"
    buf = bytearray(4096)
    with trio.fail_after(10), pytest.raises(RequestFailed) as info:
        await dev.read(0, [buf])
    assert info.value.errno == errno.ETIMEDOUT
    with trio.fail_after(10):
        await pause.send_all(b"r")
        assert await pause.receive_some(1) == b"R"
        await dev.read(0, [buf])
    assert buf == b"p" * 4096
    await pause.aclose()
    await dev.aclose()


# --- qemu-nbd -----------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["-A"]], ids=["plain", "allocation-depth"])
async def test_qemu_nbd_holes_and_extents(
    nursery: trio.Nursery, short_tmp: Path, start: Start, extra: list[str]
) -> None:
    """qemu-nbd sends HOLE chunks; with -A it offers a second context we do not select."""
    blob = os.urandom(64 << 10)
    image = sparse_image(short_tmp / "s.raw", 8 << 20, (1 << 20, blob))
    argv = ["qemu-nbd", "-t", "-e", "0", *extra, "-k", "{sock}", "-x", "disk0", "-f", "raw"]
    peer = start([*argv, str(image)])
    dev = await remote(nursery, peer.uri("disk0"))
    buf = bytearray(8 << 20)
    with trio.fail_after(10):
        await dev.read(0, [buf])
        extents = await dev.extents(0, (8 << 20) // 512)
    assert buf == image.read_bytes()
    data = [e for e in extents if e.is_data]
    assert data and data[0].sector <= 2048 and data[-1].end >= 2048 + 128
    assert sum(e.count for e in data) < 1024
    await dev.aclose()


async def test_qemu_nbd_read_only_named_export(
    nursery: trio.Nursery, short_tmp: Path, start: Start
) -> None:
    image = sparse_image(short_tmp / "ro.raw", 1 << 20, (0, b"qemu"))
    peer = start(
        [
            "qemu-nbd",
            "-t",
            "-e",
            "0",
            "-r",
            "-k",
            "{sock}",
            "-x",
            "ro-disk",
            "-f",
            "raw",
            str(image),
        ]
    )
    dev = await remote(nursery, peer.uri("ro-disk"))
    assert not (await dev.get_info()).read_write
    with pytest.raises(ReadOnly):
        await dev.write(0, [bytes(512)])
    with pytest.raises(HandshakeRefused, match="no export named 'other'"):
        await remote(nursery, peer.uri("other"))
    await dev.aclose()


# --- nbd-server -----------------------------------------------------------------------


NBD_SERVER_CONF = """
[generic]
    unixsock = {sock}
    allowlist = {allowlist}
[disk1]
    exportname = {image}
    flush = true
    fua = true
    trim = true
"""


@pytest.fixture
def nbd_server(short_tmp: Path) -> Iterator[Callable[[bool], DaemonPeer]]:
    with contextlib.ExitStack() as stack:

        def run(allowlist: bool) -> DaemonPeer:
            require_tool("nbd-server", "nbd-server")
            image = sparse_image(short_tmp / "disk1.img", 4 << 20, (0, b"reference"))
            listing = str(allowlist).lower()
            conf = NBD_SERVER_CONF.format(sock="{sock}", allowlist=listing, image=image)
            return stack.enter_context(DaemonPeer(conf, short_tmp))

        yield run


async def test_nbd_server_simple_replies(
    nursery: trio.Nursery, nbd_server: Callable[[bool], DaemonPeer]
) -> None:
    peer = nbd_server(False)
    dev = await remote(nursery, peer.uri("disk1"))
    assert not dev._link.client._tx.structured
    assert Capability.EXTENTS not in dev.capabilities
    assert (await dev.get_info()).size_bytes == 4 << 20
    data = os.urandom(1 << 20)
    buf = bytearray(len(data))
    with trio.fail_after(10):
        await dev.write(2048, [data])
        await dev.flush()
        await dev.read(2048, [buf])
        await dev.discard(0, 8)
    assert buf == data
    await dev.aclose()
    out = subprocess.run(
        [sys.executable, "-m", "blockfuse.cli", "ls", peer.uri()],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 1
    assert "refuses to list its exports (NBD_REP_ERR_POLICY" in out.stderr


async def test_nbd_server_listing_allowed(nbd_server: Callable[[bool], DaemonPeer]) -> None:
    peer = nbd_server(True)
    with trio.fail_after(10):
        found = await list_exports(parse_uri(peer.uri()))
    # nbd-server's NBD_INFO_EXPORT says 0 bytes; the size comes from an EXPORT_NAME probe
    assert [(e.name, e.size) for e in found] == [("disk1", 4 << 20)]


def test_ls_on_a_one_session_nbd_server(short_tmp: Path) -> None:
    """``nbd-server -d`` serves one session: ``ls`` learns the first export's size with a
    second connection, which ends the server, so the third connection (for the second
    export's size) is refused.  That printed a 50-line ExceptionGroup traceback; now the
    size it could not learn is shown as ``?``."""
    require_tool("nbd-server", "nbd-server")
    sock = short_tmp / "nbd.sock"
    conf = short_tmp / "nbd-server.conf"
    sections = [f"[generic]\n    unixsock = {sock}\n    allowlist = true\n"]
    for name in ("a", "b"):
        sparse_image(short_tmp / name, 2 << 20)
        sections.append(f"[{name}]\n    exportname = {short_tmp / name}\n")
    conf.write_text("".join(sections))
    log = open(short_tmp / "nbd-server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["nbd-server", "-C", str(conf), "-d"], stdout=log, stderr=log, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "nbd-server did not start"
            time.sleep(0.02)
        out = subprocess.run(
            [sys.executable, "-m", "blockfuse.cli", "ls", f"nbd+unix:///?socket={sock}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout == "a\t2 MiB\t\nb\t?\t\n"
