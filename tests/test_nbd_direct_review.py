"""Hazards of the lone path (transport/receiver.py's turn) found in review: each test is
a behaviour that must hold whatever the server's pace."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from blockfuse.errors import BlockError
from blockfuse.nbd import constants as c
from blockfuse.transport.tls import StreamWrapper

from .hostile_nbd import Hostile, Script
from .test_nbd_direct import BLOCK, Timed, connect

MIB = 1 << 20


class Gated(StreamWrapper):
    """A server's end that reads nothing while ``gate`` is shut (its buffers fill)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.open = trio.Event()
        self.open.set()

    def shut(self) -> None:
        self.open = trio.Event()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await self.open.wait()
        return await self.inner.receive_some(max_bytes)


class GatedHostile(Hostile):
    """The hostile server (well-behaved by default) behind a ``Gated`` end."""

    gate: Gated

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.gate = Gated(stream)
        await super().handle(self.gate)


async def test_replies_are_read_while_a_lone_callers_send_carries_others(
    nursery: trio.Nursery,
) -> None:
    """A lone WRITE too big for the socket is still being sent when a READ and another
    WRITE come; its caller's send carries theirs too.  An in-order server answers the
    first WRITE, then the READ, and stops reading until that reply is read: somebody must
    read while the sending goes on, or neither side moves until the timeout drops the
    connection (every call failing with ``Stalled``)."""
    hostile = GatedHostile(Script(size=64 * MIB))
    client = await connect(nursery, hostile, "socket", request_timeout=2)
    first, third = os.urandom(8 * MIB), os.urandom(8 * MIB)
    second = bytearray(8 * MIB)
    failures: list[BaseException] = []

    async def op(fn: Callable[..., Awaitable[None]], *args: object) -> None:
        try:
            await fn(*args)
        except BlockError as exc:
            failures.append(exc)

    async def registered(calls: int) -> None:
        """Until ``calls`` requests are in flight (polled: nothing says so)."""
        while len(client._calls) < calls:  # noqa: ASYNC110
            await trio.sleep(0.001)

    with trio.fail_after(20):
        hostile.gate.shut()
        async with trio.open_nursery() as ops:
            ops.start_soon(op, client.pwrite, memoryview(first), 0)
            while not client._sender.busy:  # noqa: ASYNC110 (its send waits for the server)
                await trio.sleep(0.001)
            ops.start_soon(op, client.pread, memoryview(second), 8 * MIB)
            await registered(2)  # the READ goes first on the wire, then the WRITE
            ops.start_soon(op, client.pwrite, memoryview(third), 16 * MIB)
            await registered(3)
            hostile.gate.open.set()
    assert not failures and client.broken is None, failures
    assert hostile.read(0, 8 * MIB) == first and bytes(second) == bytes(8 * MIB)
    assert hostile.read(16 * MIB, 8 * MIB) == third
    await client.aclose()


async def test_a_lone_caller_woken_as_its_socket_closes_reads_no_other_file(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The caller's socket becomes readable; before the caller runs, another task closes
    the connection (``aclose``, or the reader task dropping it at a deadline: trio runs
    them in any order in one batch), and the number of that socket is some other file's
    by the time the caller reads (any task or thread that opens one gets the lowest free
    number).  The caller must not read that file: its READ fails, and the file is
    untouched.  Here the other file holds a reply to the caller's cookie, as another
    NBD connection's socket might."""
    server = Timed()
    client = await connect(nursery, server, "socket")
    fd = client._stream.socket.fileno()  # type: ignore[attr-defined]
    foreign = tmp_path / "other"
    header = c.DATA_CHUNK_HEADER.pack(
        c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE, c.Chunk.OFFSET_DATA, 1, 8 + BLOCK, 0
    )
    foreign.write_bytes(header + b"X" * BLOCK)
    real = trio.lowlevel.wait_readable
    meanwhile: list[int] = []

    async def wait_readable(what: int) -> None:
        await real(what)
        if what == fd and not meanwhile:  # what runs between the wake-up and the read
            client._stream.socket.close()  # type: ignore[attr-defined]
            other = os.open(foreign, os.O_RDONLY)  # the lowest free number: fd itself
            if other != fd:
                os.dup2(other, fd)
                os.close(other)
            meanwhile.append(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", wait_readable)
    buf = bytearray(BLOCK)
    try:
        with trio.fail_after(10):
            with contextlib.suppress(BlockError):
                await client.pread(memoryview(buf), 0)
        assert meanwhile
        assert bytes(buf) != b"X" * BLOCK, "the READ returned another file's bytes"
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0, "another file was read from"
        assert client.broken is not None
    finally:
        if meanwhile:
            os.close(fd)
