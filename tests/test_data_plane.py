"""The mirror copier's data plane (``transport/blocking.py``) against a real nbdkit:
reads in worker threads over connections of their own, only where the server allows
several connections (``CAN_MULTI_CONN``) and never in plaintext for an ``nbds`` URI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from blockfuse.devices.remote import RemoteDevice, open_remote
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
