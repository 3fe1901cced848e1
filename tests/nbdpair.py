"""A client core and the real server core wired back to back, with a bytearray as the disk.

``feed`` delivers each byte stream either whole or one byte at a time, so every test
that uses a ``Pair`` also proves the cores cope with any split of the stream.  READ
answers come as chunks in reverse order (``reversed_read``), holes for zero blocks, so
the client's reassembly is exercised; everything else is the server core's own replies.
"""

from __future__ import annotations

from blockfuse.nbd.constants import HOLE, U64, Chunk, Cmd, TxFlag
from blockfuse.nbd.events import (
    NEED_DATA,
    BlockStatus,
    Done,
    ExportInfo,
    Negotiated,
    PayloadComing,
    ReadData,
    ReadHole,
    ReadReply,
    Reply,
    Request,
    RequestRefused,
    ServerReady,
    StatusReply,
)
from blockfuse.nbd.handshake import ClientHandshake
from blockfuse.nbd.replies import chunk
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
    """``data`` to ``core``, whole or byte by byte; nothing if empty (b"" would be EOF)."""
    if not data:
        return
    if not bytewise:
        core.receive_data(data)  # type: ignore[attr-defined]
        return
    for i in range(len(data)):
        core.receive_data(data[i : i + 1])  # type: ignore[attr-defined]


def drain(core: object) -> list[object]:
    events = []
    while (event := core.next_event()) is not NEED_DATA:  # type: ignore[attr-defined]
        events.append(event)
        if not isinstance(
            event, (Request, RequestRefused, PayloadComing, ReadData, ReadHole, BlockStatus, Done)
        ):
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


def reversed_read(cookie: int, offset: int, data: bytes, block: int = 4096) -> bytes:
    """A structured READ answer as chunks, last first, with holes for all-zero blocks."""
    pieces = [(i, data[i : i + block]) for i in range(0, len(data), block)]
    out = bytearray()
    for n, (i, piece) in enumerate(reversed(pieces)):
        done = n == len(pieces) - 1
        if piece.count(0) == len(piece):
            out += chunk(cookie, Chunk.OFFSET_HOLE, HOLE.size, done=done)
            out += HOLE.pack(offset + i, len(piece))
        else:
            out += chunk(cookie, Chunk.OFFSET_DATA, 8 + len(piece), done=done)
            out += U64.pack(offset + i) + piece
    return bytes(out)


def answer(server: ServerCore, disk: bytearray, req: Request) -> bytes:
    """The bytes of a well-behaved answer to ``req`` on ``disk``."""
    if req.cmd == Cmd.READ:
        data = bytes(disk[req.offset : req.end])
        if server.structured:
            server.in_flight -= 1
            return reversed_read(req.cookie, req.offset, data)
        return b"".join(server.send(ReadReply(req.cookie, req.offset, (data,))))
    if req.cmd == Cmd.WRITE:
        disk[req.offset : req.end] = req.data
    elif req.cmd in (Cmd.TRIM, Cmd.WRITE_ZEROES):
        disk[req.offset : req.end] = bytes(req.length)
    elif req.cmd == Cmd.BLOCK_STATUS:
        return b"".join(server.send(StatusReply(req.cookie, extents(disk, req.offset, req.length))))
    return b"".join(server.send(Reply(req.cookie)))


def extents(disk: bytearray, offset: int, length: int) -> tuple[tuple[int, int], ...]:
    """``base:allocation`` of ``disk``: 4 KiB blocks of zeroes are holes."""
    out: list[tuple[int, int]] = []
    for start in range(offset, offset + length, 4096):
        block = disk[start : min(start + 4096, offset + length)]
        flags = 3 if block.count(0) == len(block) else 0
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + len(block), flags)
        else:
            out.append((len(block), flags))
    return tuple(out)


class Pair:
    def __init__(
        self, size: int = 1 << 20, *, bytewise: bool = False, flags: TxFlag = FULL_FLAGS, **kw
    ) -> None:  # type: ignore[no-untyped-def]
        self.disk = bytearray(size)
        self.export = ExportInfo("disk", size, flags, "a test disk")
        self.server = ServerCore([self.export], **kw)
        self.bytewise = bytewise
        self.replies = bytearray()
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
            if isinstance(req, Request):
                self.replies += answer(self.server, self.disk, req)

    def push(self, data: bytes) -> None:
        """Raw bytes to the client, after the replies so far."""
        self.replies += data

    def receive(self) -> list[object]:
        feed(self.client, self.server.data_to_send() + self.replies, self.bytewise)
        self.replies.clear()
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
