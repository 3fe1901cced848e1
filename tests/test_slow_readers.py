"""A peer that reads slowly but steadily is not a stalled one: a send gives up only when
nothing at all was taken for its timeout, not when one large part takes longer than
that as a whole (a 32 MiB READ reply to a client on a slow link)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import trio

from blockfuse.errors import BlockError
from blockfuse.filerange import FileRange
from blockfuse.transport.sender import Sender
from blockfuse.transport.writer import MessageWriter

MiB = 1 << 20
TIMEOUT = 1.0
"""The send timeout under test; the whole part takes ~2.5 s to be read."""
SIZE = 4 * MiB
STEP, PAUSE = 32 << 10, 0.02
"""The reader takes STEP bytes every PAUSE seconds: ~1.6 MiB/s, never idle for long."""


def socket_pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    return a, b


async def read_slowly(sock: trio.socket.SocketType, size: int, into: bytearray) -> None:
    while len(into) < size:
        await trio.sleep(PAUSE)
        data = await sock.recv(STEP)
        if not data:
            return
        into.extend(data)


async def test_the_servers_writer_waits_on_a_client_that_reads_slowly(tmp_path: Path) -> None:
    a, b = socket_pair()
    out = MessageWriter(trio.SocketStream(a), a.fileno(), "slow client", timeout=TIMEOUT)
    data = os.urandom(SIZE)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    lent = FileRange(fd, 0, SIZE, lambda: None, lambda exc: None)
    got = bytearray()
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(read_slowly, b, 2 * SIZE, got)
            await out.write([data])  # bytes
            await out.write([lent])  # a range of a file
    assert got == data + data
    os.close(fd)
    a.close()
    b.close()


async def test_the_clients_sender_waits_on_a_server_that_reads_slowly() -> None:
    a, b = socket_pair()
    broken: list[BlockError] = []
    sender = Sender(trio.SocketStream(a), a.fileno(), "slow server", TIMEOUT, broken.append)
    data = os.urandom(SIZE)
    got = bytearray()
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(read_slowly, b, SIZE + 16, got)
            sender.queue(b"h" * 16, memoryview(data))
            await sender.send(batch=False, until=trio.current_time() + 30)
    assert not broken, broken
    assert got == b"h" * 16 + data
    a.close()
    b.close()
