"""A client core and a server core wired back to back, with a bytearray as the disk.

``feed`` delivers each byte stream either whole or one byte at a time, so every test
that uses a ``Pair`` also proves the cores cope with any split of the stream.
"""

from __future__ import annotations

from blockfuse.nbd.constants import Cmd, TxFlag
from blockfuse.nbd.events import (
    NEED_DATA,
    BlockStatus,
    Done,
    ExportInfo,
    Negotiated,
    ReadData,
    ReadHole,
    Request,
    ServerReady,
)
from blockfuse.nbd.handshake import ClientHandshake
from blockfuse.nbd.server import ServerCore
from blockfuse.nbd.transmission import ClientTransmission

FULL_FLAGS = (
    TxFlag.HAS_FLAGS
    | TxFlag.SEND_FLUSH
    | TxFlag.SEND_FUA
    | TxFlag.SEND_TRIM
    | TxFlag.SEND_WRITE_ZEROES
    | TxFlag.SEND_DF
)


def feed(core: object, data: bytes, bytewise: bool) -> None:
    if not bytewise:
        core.receive_data(data)  # type: ignore[attr-defined]
        return
    for i in range(len(data)):
        core.receive_data(data[i : i + 1])  # type: ignore[attr-defined]


def drain(core: object) -> list[object]:
    events = []
    while (event := core.next_event()) is not NEED_DATA:  # type: ignore[attr-defined]
        events.append(event)
        if not isinstance(event, (Request, ReadData, ReadHole, BlockStatus, Done)):
            break
    return events


def handshake(client: ClientHandshake, server: ServerCore, bytewise: bool) -> object:
    """Run both handshakes to the end; the client's outcome."""
    for _ in range(1000):
        feed(client, server.data_to_send(), bytewise)
        event = client.next_event()
        feed(server, client.data_to_send(), bytewise)
        server_events = drain(server)
        if event is not NEED_DATA:
            feed(server, client.data_to_send(), bytewise)
            drain(server)
            return event
        assert all(isinstance(e, ServerReady) for e in server_events)
    raise AssertionError("handshake did not finish")


class Pair:
    def __init__(
        self, size: int = 1 << 20, *, bytewise: bool = False, flags: TxFlag = FULL_FLAGS, **kw
    ) -> None:  # type: ignore[no-untyped-def]
        self.disk = bytearray(size)
        self.export = ExportInfo("disk", size, flags, "a test disk")
        self.server = ServerCore({"disk": self.export}, **kw)
        self.bytewise = bytewise
        outcome = handshake(ClientHandshake.go("disk"), self.server, bytewise)
        assert isinstance(outcome, Negotiated), outcome
        self.negotiated = outcome
        self.client = ClientTransmission(outcome)

    def send(self, cmd: Cmd, offset: int = 0, length: int = 0, payload: bytes = b"") -> int:
        cookie, header = self.client.request(cmd, offset, length)
        feed(self.server, header + payload, self.bytewise)
        return cookie

    def serve(self) -> None:
        """Answer every request the server has, in reverse order."""
        for req in reversed(drain(self.server)):
            assert isinstance(req, Request)
            self.answer(req)

    def answer(self, req: Request) -> None:
        s = self.server
        if req.cmd == Cmd.READ:
            s.reply_read(req.cookie, req.offset, bytes(self.disk[req.offset : req.end]))
        elif req.cmd == Cmd.WRITE:
            self.disk[req.offset : req.offset + req.length] = req.data
            s.reply(req.cookie)
        elif req.cmd in (Cmd.TRIM, Cmd.WRITE_ZEROES):
            self.disk[req.offset : req.offset + req.length] = bytes(req.length)
            s.reply(req.cookie)
        elif req.cmd == Cmd.BLOCK_STATUS:
            s.reply_block_status(req.cookie, [(req.length, 0)])
        else:
            s.reply(req.cookie)

    def receive(self) -> list[object]:
        feed(self.client, self.server.data_to_send(), self.bytewise)
        return drain(self.client)

    def read(self, offset: int, length: int) -> tuple[bytes, Done]:
        cookie = self.send(Cmd.READ, offset, length)
        self.serve()
        buf = bytearray(length)
        done = None
        for event in self.receive():
            if isinstance(event, ReadData):
                assert event.cookie == cookie
                start = event.offset - offset
                buf[start : start + len(event.data)] = event.data
            elif isinstance(event, ReadHole):
                start = event.offset - offset
                buf[start : start + event.length] = bytes(event.length)
            elif isinstance(event, Done):
                done = event
        assert done is not None and done.cookie == cookie
        return bytes(buf), done
