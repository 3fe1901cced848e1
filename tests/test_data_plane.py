"""The mirror copier's data plane (``transport/blocking.py``) against a real nbdkit:
reads in worker threads over connections of their own, only where the server allows
several connections (``CAN_MULTI_CONN``) and never in plaintext for an ``nbds`` URI."""

from __future__ import annotations

import os
import re
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
