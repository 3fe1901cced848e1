"""An in-process NBD server for transport tests: the real server core over a trio stream.

It answers each batch of requests in reverse order (so replies come out of order), can
fail reads with an errno, and can drop the connection after a number of requests.
"""

from __future__ import annotations

import errno

import trio
import trio.testing

from blockfuse.nbd.constants import Cmd, TxFlag
from blockfuse.nbd.events import ClientGone, ExportInfo, Reply, Request
from blockfuse.nbd.server import ServerCore
from blockfuse.transport.client import NBDClient
from blockfuse.transport.connect import wrap_nbd_stream

from .nbdpair import FULL_FLAGS, answer, drain


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
        core = ServerCore([self.export], structured=self.structured)
        async with stream:
            await stream.send_all(core.data_to_send())
            while data := await stream.receive_some(1 << 16):
                core.receive_data(data)
                events = drain(core)
                out = core.data_to_send()
                for event in reversed(events):
                    if not isinstance(event, Request):
                        continue
                    reply = self.answer(core, event)
                    if reply is None:
                        return
                    out += reply
                await stream.send_all(out)
                if any(isinstance(e, ClientGone) for e in events):
                    self.disconnects += 1
                    self.disconnected.set()
                    return

    def answer(self, core: ServerCore, req: Request) -> bytes | None:
        """The bytes answering ``req``, or ``None`` to drop the connection instead."""
        self.requests += 1
        self.largest_request = max(self.largest_request, req.length)
        if self.drop_after is not None and self.requests > self.drop_after:
            self.drop_after = None
            return None
        if req.cmd == Cmd.READ and self.read_errno:
            error = self.read_errno
            if self.read_errno == errno.ESHUTDOWN:
                self.read_errno = 0
            return b"".join(core.send(Reply(req.cookie, error, "injected")))
        return answer(core, self.disk, req)

    async def connect(self, nursery: trio.Nursery) -> NBDClient:
        """A new client connection over an in-memory stream pair."""
        if not self.up:
            from blockfuse.transport.handshake import ConnectionLost

            raise ConnectionLost("fake server is down")
        client_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(self.handle, server_end)
        return await wrap_nbd_stream(nursery, client_end, "disk", server="fake")
