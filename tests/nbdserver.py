"""An in-process NBD server for transport tests: the sans-io server core over a trio stream.

It answers each batch of requests in reverse order (so replies come out of order), can
fail reads with an errno, and can drop the connection after a number of requests.
"""

from __future__ import annotations

import errno

import trio
import trio.testing

from blockfuse.nbd.constants import Cmd, TxFlag
from blockfuse.nbd.events import ClientGone, ExportInfo, Request
from blockfuse.nbd.server import ServerCore
from blockfuse.transport.client import NBDClient
from blockfuse.transport.connect import wrap_nbd_stream

from .nbdpair import FULL_FLAGS, drain


class FakeServer:
    def __init__(
        self, size: int = 1 << 20, *, flags: TxFlag = FULL_FLAGS, structured: bool = True
    ) -> None:
        self.disk = bytearray(size)
        self.export = ExportInfo("disk", size, flags, "fake")
        self.structured = structured
        self.read_errno = 0
        self.drop_after: int | None = None
        self.requests = 0
        self.connections = 0
        self.largest_request = 0
        self.up = True
        self.disconnects = 0
        self.disconnected = trio.Event()

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        core = ServerCore({"disk": self.export}, structured=self.structured)
        async with stream:
            await stream.send_all(core.data_to_send())
            while data := await stream.receive_some(1 << 16):
                core.receive_data(data)
                events = drain(core)
                for event in reversed(events):
                    if isinstance(event, Request) and not self.answer(core, event):
                        return
                await stream.send_all(core.data_to_send())
                if any(isinstance(e, ClientGone) for e in events):
                    self.disconnects += 1
                    self.disconnected.set()
                    return

    def answer(self, core: ServerCore, req: Request) -> bool:
        self.requests += 1
        self.largest_request = max(self.largest_request, req.length)
        if self.drop_after is not None and self.requests > self.drop_after:
            self.drop_after = None
            return False
        if req.cmd == Cmd.READ and self.read_errno:
            core.reply_error(req.cookie, self.read_errno, "injected")
            if self.read_errno == errno.ESHUTDOWN:
                self.read_errno = 0
        elif req.cmd == Cmd.READ:
            core.reply_read(req.cookie, req.offset, bytes(self.disk[req.offset : req.end]))
        elif req.cmd == Cmd.WRITE:
            self.disk[req.offset : req.end] = req.data
            core.reply(req.cookie)
        elif req.cmd in (Cmd.TRIM, Cmd.WRITE_ZEROES):
            self.disk[req.offset : req.end] = bytes(req.length)
            core.reply(req.cookie)
        elif req.cmd == Cmd.BLOCK_STATUS:
            core.reply_block_status(req.cookie, self.extents(req.offset, req.length))
        else:
            core.reply(req.cookie)
        return True

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for start in range(offset, offset + length, 4096):
            block = self.disk[start : start + 4096]
            flags = 3 if block.count(0) == len(block) else 0
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + len(block), flags)
            else:
                out.append((len(block), flags))
        return out

    async def connect(self, nursery: trio.Nursery) -> NBDClient:
        """A new client connection over an in-memory stream pair."""
        if not self.up:
            from blockfuse.transport.handshake import ConnectionLost

            raise ConnectionLost("fake server is down")
        client_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(self.handle, server_end)
        return await wrap_nbd_stream(nursery, client_end, "disk", server="fake")
