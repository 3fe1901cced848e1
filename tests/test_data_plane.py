"""The mirror copier's data plane (``transport/blocking.py``) against a real nbdkit:
reads in worker threads over connections of their own, only where the server allows
several connections (``CAN_MULTI_CONN``) and never in plaintext for an ``nbds`` URI."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from blockfuse.devices.mirror import open_mirror
from blockfuse.devices.remote import RemoteDevice, open_remote
from blockfuse.devices.sparse import open_sparse
from blockfuse.nbd.uri import parse_uri
from blockfuse.transport.blocking import Plane
from blockfuse.transport.handshake import TimedOut

from .conftest import Start, require_tool
from .nbdpeers import Peer
from .test_tls_interop import nbdkit_tls, nbds
from .tlscerts import Certificates, make_certificates


def nbdkit_file(directory: Path, *filters: str) -> list[str]:
    """nbdkit serving ``directory/p.img``: ``filters`` are ``--filter=`` options and their
    parameters, in either order."""
    options = [f for f in filters if f.startswith("--")]
    parameters = [f for f in filters if not f.startswith("--")]
    image = str(directory / "p.img")
    return ["nbdkit", "-f", "-U", "{sock}", *options, "file", image, *parameters]


async def remote(nursery: trio.Nursery, uri: str) -> RemoteDevice:
    with trio.fail_after(20):
        return await open_remote(nursery, parse_uri(uri), request_timeout=2)


@pytest.fixture
def image(short_tmp: Path) -> bytes:
    data = os.urandom(4 << 20)
    (short_tmp / "p.img").write_bytes(data)
    return data


async def read_in_threads(plane: Plane, offset: int, length: int, count: int) -> list[bytes]:
    """``count`` concurrent reads of the same range, each in a worker thread."""
    out: list[bytes] = [b""] * count

    async def one(i: int) -> None:
        buf = bytearray(length)
        await trio.to_thread.run_sync(plane.read_into, memoryview(buf), offset)
        out[i] = bytes(buf)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
    return out


async def test_reads_in_threads_match_the_export(
    nursery: trio.Nursery, start: Start, short_tmp: Path, image: bytes
) -> None:
    peer = start(nbdkit_file(short_tmp))
    dev = await remote(nursery, peer.uri())
    plane = dev.data_plane()
    assert plane is not None
    try:
        offset, length = 512 << 10, 3 << 20  # more than one maximum payload
        for got in await read_in_threads(plane, offset, length, 4):
            assert got == image[offset : offset + length]
    finally:
        plane.close()
        await dev.aclose()


async def test_no_plane_without_multi_conn(
    nursery: trio.Nursery, start: Start, short_tmp: Path, image: bytes
) -> None:
    """Another connection need not see a write this one had acknowledged."""
    peer = start(nbdkit_file(short_tmp, "--filter=multi-conn", "multi-conn-mode=disable"))
    dev = await remote(nursery, peer.uri())
    try:
        assert dev.data_plane() is None
    finally:
        await dev.aclose()


async def test_no_plaintext_plane_for_an_nbds_export(
    nursery: trio.Nursery, short_tmp: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``nbds`` is TLS or nothing: the plane's plain sockets must not carry it."""
    certs: Certificates = make_certificates(tmp_path_factory.mktemp("tls"))
    require_tool("nbdkit", "nbdkit")
    with Peer(nbdkit_tls(certs), short_tmp) as peer:
        dev = await remote(nursery, nbds(peer, certs))
        try:
            assert dev.address.tls is not None
            assert dev.data_plane() is None
        finally:
            await dev.aclose()


async def test_a_stalled_server_fails_the_read_with_the_timeout(
    nursery: trio.Nursery, start: Start, short_tmp: Path, image: bytes
) -> None:
    peer = start(nbdkit_file(short_tmp, "--filter=delay", "delay-read=30"))
    dev = await remote(nursery, peer.uri())
    plane = dev.data_plane()
    assert plane is not None
    try:
        with trio.fail_after(20), pytest.raises(TimedOut):
            await trio.to_thread.run_sync(plane.read_into, memoryview(bytearray(4096)), 0)
    finally:
        plane.close()
        await dev.aclose()


def source_image(directory: Path) -> bytes:
    """``p.img``: 16 MiB with data, a hole and data (the mirror's primary)."""
    data = bytearray(16 << 20)
    data[: 5 << 20] = os.urandom(5 << 20)
    data[11 << 20 :] = os.urandom(5 << 20)
    (directory / "p.img").write_bytes(bytes(data))
    return bytes(data)


async def mirror_to_sparse(
    nursery: trio.Nursery, uri: str, secondary: Path, **options: object
) -> str:
    """Copy ``uri`` to ``sparse(secondary)`` until synced; the copy's last error."""
    primary = await remote(nursery, uri)
    target = open_sparse(str(secondary), size_bytes=16 << 20)
    with trio.fail_after(60):
        async with open_mirror(primary, target, chunk=1 << 20, **options) as mirror:
            await mirror.wait_synced()
            return mirror.statistics().last_error


async def test_a_mirror_copies_through_the_plane(
    nursery: trio.Nursery, start: Start, short_tmp: Path
) -> None:
    """nbdkit's log shows connections beyond the trio client's (the plane's)."""
    data = source_image(short_tmp)
    log = short_tmp / "nbdkit-requests.log"
    peer = start(nbdkit_file(short_tmp, "--filter=log", f"logfile={log}"))
    last_error = await mirror_to_sparse(nursery, peer.uri(), short_tmp / "s.img")
    assert last_error == ""
    assert (short_tmp / "s.img").read_bytes() == data
    readers = set(re.findall(r"connection=(\d+) Read ", log.read_text()))
    assert len(readers) >= 2, readers


async def test_a_failing_plane_leaves_the_copy_to_the_connection_it_shares(
    nursery: trio.Nursery, start: Start, short_tmp: Path
) -> None:
    """While reads fail, the plane's first failure retires it; the trio client's reads
    fail too and the item is retried; once reads work again the copy ends, equal."""
    data = source_image(short_tmp)
    inject = short_tmp / "inject"
    inject.touch()
    peer = start(nbdkit_file(short_tmp, "--filter=error", "error-pread=EIO",
                             "error-pread-rate=100%", f"error-pread-file={inject}"))  # fmt: skip

    async def heal() -> None:
        await trio.sleep(0.5)
        inject.unlink()

    nursery.start_soon(heal)
    primary = await remote(nursery, peer.uri())
    target = open_sparse(str(short_tmp / "s.img"), size_bytes=16 << 20)
    with trio.fail_after(60):
        async with open_mirror(primary, target, chunk=1 << 20, backoff=0.2) as mirror:
            await mirror.wait_synced()
            errors = mirror.statistics().errors
    assert errors >= 1
    assert (short_tmp / "s.img").read_bytes() == data


def percache_server(directory: Path, image: Path) -> list[str]:
    """nbdkit serving ``image`` with a write cache per connection (``percache_plugin``),
    CAN_MULTI_CONN by the multi-conn filter's emulation."""
    wrapper = directory / "percache.sh"
    plugin = Path(__file__).with_name("percache_plugin.py")
    wrapper.write_text(f'#!/bin/sh\nIMAGE={image} exec {sys.executable} {plugin} "$@"\n')
    wrapper.chmod(0o755)
    return ["nbdkit", "-f", "-U", "{sock}", "--filter=multi-conn", "sh", str(wrapper),
            "multi-conn-mode=emulate"]  # fmt: skip


async def test_a_chunk_written_since_the_last_flush_is_flushed_before_the_plane_reads_it(
    nursery: trio.Nursery, start: Start, short_tmp: Path
) -> None:
    """CAN_MULTI_CONN promises only that a flush's effects show on every connection: an
    acknowledged write on the mirror's connection need not show on the plane's.  A
    write during the copy, into a chunk not copied yet, must still reach the secondary
    (it once stayed old there, marked copied)."""
    size, chunk = 8 << 20, 1 << 20
    old, new = os.urandom(size), os.urandom(chunk)
    (short_tmp / "p.img").write_bytes(old)
    peer = start(percache_server(short_tmp, short_tmp / "p.img"))
    primary = await remote(nursery, peer.uri())
    target = open_sparse(str(short_tmp / "s.img"), size_bytes=size)
    with trio.fail_after(120):
        async with open_mirror(primary, target, chunk=chunk, rate=2 * chunk, in_flight=2) as m:
            assert m._copier._plane is not None  # the plane is what this is about
            await m.write((size - chunk) // 512, [new])  # acknowledged, not flushed
            await m.wait_synced()
            back = bytearray(chunk)
            await m.read((size - chunk) // 512, [back])
    assert back == new
    assert (short_tmp / "s.img").read_bytes()[-chunk:] == new


class TrickleProxy:
    """A Unix socket in front of ``upstream`` that passes the server's answers on 64 KiB
    at a time, ``pause`` seconds apart: never silent for long, never done.  Its threads
    end with ``stop()``."""

    def __init__(self, path: Path, upstream: str, pause: float) -> None:
        self.path, self._upstream, self._pause = path, upstream, pause
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(path))
        self._listener.listen(8)
        self._listener.settimeout(0.1)
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            server = socket.socket(socket.AF_UNIX)
            server.connect(self._upstream)
            for src, dst, pause in ((client, server, 0.0), (server, client, self._pause)):
                t = threading.Thread(target=self._pump, args=(src, dst, pause), daemon=True)
                self._threads.append(t)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, pause: float) -> None:
        with contextlib.suppress(OSError):
            src.settimeout(0.1)
            while not self._stop.is_set():
                try:
                    data = src.recv(64 << 10)
                except TimeoutError:
                    continue
                if not data:
                    break
                dst.sendall(data)
                self._stop.wait(pause)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        self._listener.close()


async def test_a_server_that_trickles_its_answer_times_out_too(
    nursery: trio.Nursery, start: Start, short_tmp: Path, image: bytes
) -> None:
    """The timeout bounds the whole read, not each socket call: a chunk trickling in at
    64 KiB per 0.3 s would take 20 s; the read fails at 2 s (the thread held the chunk's
    range lock all along)."""
    peer = start(nbdkit_file(short_tmp))
    assert peer.path is not None
    proxy = TrickleProxy(short_tmp / "trickle.sock", peer.path, 0.3)
    try:
        dev = await remote(nursery, f"nbd+unix:///?socket={proxy.path}")
        plane = dev.data_plane()
        assert plane is not None
        try:
            began = trio.current_time()
            with trio.fail_after(15), pytest.raises(TimedOut):
                buf = memoryview(bytearray(4 << 20))
                await trio.to_thread.run_sync(plane.read_into, buf, 0)
            assert trio.current_time() - began < 5
        finally:
            plane.close()
            await dev.aclose()
    finally:
        proxy.stop()


async def test_a_closed_plane_closes_the_connections_its_reads_were_using(
    nursery: trio.Nursery, start: Start, short_tmp: Path, image: bytes
) -> None:
    log = short_tmp / "nbdkit-requests.log"
    peer = start(nbdkit_file(short_tmp, "--filter=log", "--filter=delay", f"logfile={log}",
                             "delay-read=1"))  # fmt: skip
    dev = await remote(nursery, peer.uri())
    plane = dev.data_plane()
    assert plane is not None
    read = functools.partial(plane.read_into, memoryview(bytearray(4096)), 0)
    try:
        async with trio.open_nursery() as reads:
            reads.start_soon(trio.to_thread.run_sync, read)
            await logged(log, "Read ", 1)
            plane.close()  # while the read runs
        await logged(log, "Disconnect", 1)
    finally:
        await dev.aclose()


async def logged(log: Path, text: str, times: int) -> None:
    """Return once nbdkit's log holds ``text`` ``times`` times (it is another process's
    file: nothing to wait on but the file)."""
    with trio.fail_after(10):
        while (log.read_text() if log.exists() else "").count(text) < times:  # noqa: ASYNC110
            await trio.sleep(0.05)


async def test_signals_to_the_reading_thread_do_not_stretch_the_timeout(
    nursery: trio.Nursery, start: Start, short_tmp: Path, image: bytes
) -> None:
    """A signal that interrupts the kernel's wait (the socket's timeout) must not give the
    wait its whole timeout again: a stalled server, the reading thread signalled every
    0.2 s, and the read still fails at its 2 s, long before the signals stop."""
    peer = start(nbdkit_file(short_tmp, "--filter=delay", "delay-read=30"))
    dev = await remote(nursery, peer.uri())
    plane = dev.data_plane()
    assert plane is not None
    reader: list[int] = []

    def read() -> None:
        reader.append(threading.get_ident())
        plane.read_into(memoryview(bytearray(4096)), 0)

    signal.signal(signal.SIGUSR1, lambda *_: None)  # stays: see the end
    try:
        async with trio.open_nursery() as reads:
            reads.start_soon(read_expecting_timeout, read, reads.cancel_scope)
            with trio.move_on_after(15) as signalling:
                while True:
                    if reader:
                        signal.pthread_kill(reader[0], signal.SIGUSR1)
                    await trio.sleep(0.2)
        assert not signalling.cancelled_caught  # the read ended while signals came
    finally:
        # The harmless handler is not swapped back for the default, which ends the
        # process: the kernel picks a signal's action when the target thread next runs,
        # which on a busy machine may be after the swap (the whole CI run died of it).
        plane.close()
        await dev.aclose()


async def read_expecting_timeout(read: Callable[[], None], done: trio.CancelScope) -> None:
    with trio.fail_after(30), pytest.raises(TimedOut):
        await trio.to_thread.run_sync(read)
    done.cancel()
