"""READ buffers used again once their reply is written (transport/pool.py BufferPool):
the pool's own rules, and replies that stay right while buffers go round, over plain
sockets and over TLS, on several connections sharing the pool."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from blockfuse.devices.memory import MemoryDevice
from blockfuse.nbd.haggling import TLSPolicy
from blockfuse.nbd.uri import parse_uri
from blockfuse.transport.connect import connect_nbd
from blockfuse.transport.pool import IDLE_BYTES, MAX_POOLED, MIN_POOLED, BufferPool
from blockfuse.transport.tlsserver import ServerTLS

from .servekit import export_of, serving
from .test_tls_serve import nbds
from .tlscerts import Certificates, make_certificates

MiB = 1 << 20


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


def test_sizes_are_powers_of_two_within_bounds_and_idle_bytes_are_capped() -> None:
    pool = BufferPool(idle_bytes=3 * MiB)
    assert pool.take(MIN_POOLED - 1) is None and pool.take(MAX_POOLED + 1) is None
    a = pool.take(MiB - 512)
    assert a is not None and len(a) == MiB
    b, c, d = (pool.take(MiB) for _ in range(3))
    for buf in (a, b, c, d):
        assert buf is not None
        pool.give_back(buf)  # the fourth does not fit in 3 MiB idle: dropped
    again = {id(pool.take(MiB)) for _ in range(3)}
    assert again == {id(a), id(b), id(c)}
    assert IDLE_BYTES >= 4 * MAX_POOLED


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_replies_stay_right_while_buffers_go_round(
    nursery: trio.Nursery, short_tmp: Path, certs: Certificates, tls: bool
) -> None:
    """Two connections, 16 distinct 1 MiB reads each in flight, five rounds: a buffer
    given back too early would show another read's bytes."""
    device = MemoryDevice(16 * MiB)
    for i in range(16):
        await device.write(i * 2048, [bytes([i + 1]) * MiB])
    server_tls = ServerTLS.load(TLSPolicy.REQUIRE, certs.dir("server")) if tls else None
    async with serving([export_of(device)], short_tmp, tls=server_tls) as s:
        uri = nbds(s, certs) if tls else s.uri()
        with trio.fail_after(30):
            clients = [await connect_nbd(nursery, parse_uri(uri)) for _ in range(2)]
        bufs = [[memoryview(bytearray(MiB)) for _ in range(16)] for _ in clients]
        for _ in range(5):
            async with trio.open_nursery() as readers:
                for client, mine in zip(clients, bufs, strict=True):
                    for i, buf in enumerate(mine):
                        readers.start_soon(client.pread, buf, i * MiB)
            for mine in bufs:
                assert all(bytes(buf) == bytes([i + 1]) * MiB for i, buf in enumerate(mine))
        for client in clients:
            await client.aclose()


async def test_writes_stay_right_while_payload_buffers_go_round(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    """Two connections, 16 distinct WRITEs each in flight (pooled sizes, one odd length),
    five rounds: a payload buffer used again too early would land another's bytes."""
    device = MemoryDevice(32 * MiB)
    async with serving([export_of(device)], short_tmp) as s:
        with trio.fail_after(30):
            clients = [await connect_nbd(nursery, parse_uri(s.uri())) for _ in range(2)]
        for r in range(5):
            length = MiB - 512 * r
            async with trio.open_nursery() as writers:
                for c, client in enumerate(clients):
                    for i in range(16):
                        data = bytes([(r * 32 + c * 16 + i) % 251 + 1]) * length
                        writers.start_soon(client.pwrite, data, (c * 16 + i) * MiB)
            for c in range(2):
                for i in range(16):
                    want = bytes([(r * 32 + c * 16 + i) % 251 + 1]) * length
                    got = bytearray(length)
                    await device.read((c * 16 + i) * 2048, [got])
                    assert got == want
        for client in clients:
            await client.aclose()
