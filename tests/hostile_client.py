"""A scriptable NBD client in raw bytes: the peer for the tests of the server's limits.

No real client sends garbage after the handshake, options that claim gigabytes, or half
a WRITE before it vanishes, so this one builds whatever bytes a test says (``option``,
``request``, ...) and reads what the server answers::

    async with RawClient.connect(path) as c:       # a Unix socket (or RawClient(stream))
        await c.greet()                            # server flags; client flags 3 sent
        replies = await c.ask(c.option(Opt.LIST))  # every reply up to the final one
        await c.go("disk")                         # fixed newstyle, GO, transmission
        await c.send(c.request(Cmd.READ, 0, 512))
        error, cookie = await c.simple_reply()

Every wait has a deadline (``TIMEOUT``); ``closed()`` tells whether the server hung up.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Self

import trio

from blockfuse.nbd import constants as c

TIMEOUT = 10.0


def option(opt: int, data: bytes = b"", *, length: int | None = None) -> bytes:
    """An option header (with ``length`` if it should lie) and its data."""
    n = len(data) if length is None else length
    return c.OPTION.pack(c.IHAVEOPT, opt, n) + data


def name(text: str) -> bytes:
    raw = text.encode()
    return c.U32.pack(len(raw)) + raw


def info_data(export: str, *infos: int) -> bytes:
    return name(export) + c.U16.pack(len(infos)) + b"".join(c.U16.pack(i) for i in infos)


def meta_data(export: str, *queries: str) -> bytes:
    return name(export) + c.U32.pack(len(queries)) + b"".join(name(q) for q in queries)


def request(
    cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0, cookie: int = 1
) -> bytes:
    return c.REQUEST.pack(c.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


@dataclass(frozen=True)
class OptionReply:
    option: int
    rtype: int
    data: bytes

    @property
    def final(self) -> bool:
        return self.rtype == c.Rep.ACK or bool(self.rtype & c.REP_ERROR_BIT)


def option_replies(data: bytes) -> tuple[list[OptionReply], bytes]:
    """The whole option replies at the start of ``data``, and what follows them."""
    out = []
    while len(data) >= c.OPTION_REPLY.size:
        magic, opt, rtype, n = c.OPTION_REPLY.unpack(data[: c.OPTION_REPLY.size])
        assert magic == c.OPTION_REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        if len(data) < c.OPTION_REPLY.size + n:
            break
        payload = data[c.OPTION_REPLY.size : c.OPTION_REPLY.size + n]
        out.append(OptionReply(opt, rtype, payload))
        data = data[c.OPTION_REPLY.size + n :]
    return out, data


class RawClient:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = b""

    @classmethod
    async def connect(cls, path: str) -> RawClient:
        with trio.fail_after(TIMEOUT):
            return cls(await trio.open_unix_socket(path))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stream.aclose()

    option = staticmethod(option)
    request = staticmethod(request)

    async def send(self, data: bytes) -> None:
        with trio.fail_after(TIMEOUT):
            await self.stream.send_all(data)

    async def receive(self, n: int) -> bytes:
        """Exactly ``n`` bytes; ``EOFError`` if the server closes first."""
        with trio.fail_after(TIMEOUT):
            while len(self.buf) < n:
                more = await self.stream.receive_some(1 << 16)
                if not more:
                    raise EOFError(f"closed after {len(self.buf)} of {n} bytes")
                self.buf += more
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    async def closed(self, within: float = TIMEOUT) -> bool:
        """Whether the server closes the connection within ``within`` seconds (reading
        and dropping what comes)."""
        with trio.move_on_after(within):
            try:
                while await self.stream.receive_some(1 << 16):
                    pass
            except trio.BrokenResourceError:
                pass
            return True
        return False

    async def greet(self, flags: int = 3) -> int:
        """Read the greeting, send client ``flags``; the server's handshake flags."""
        magic, opt, server_flags = c.GREETING.unpack(await self.receive(c.GREETING.size))
        assert (magic, opt) == (c.NBDMAGIC, c.IHAVEOPT)
        await self.send(c.CLIENT_FLAGS.pack(flags))
        return int(server_flags)

    async def reply(self) -> OptionReply:
        opt, rtype, data = await self._reply_header()
        return OptionReply(opt, rtype, await self.receive(data))

    async def _reply_header(self) -> tuple[int, int, int]:
        magic, opt, rtype, n = c.OPTION_REPLY.unpack(await self.receive(c.OPTION_REPLY.size))
        assert magic == c.OPTION_REPLY_MAGIC
        return opt, rtype, n

    async def ask(self, data: bytes) -> list[OptionReply]:
        """Send an option; its replies up to and including the final one."""
        await self.send(data)
        replies = [await self.reply()]
        while not replies[-1].final:
            replies.append(await self.reply())
        return replies

    async def go(self, export: str = "disk", *, structured: bool = True) -> list[OptionReply]:
        await self.greet()
        if structured:
            assert (await self.ask(option(c.Opt.STRUCTURED_REPLY)))[-1].rtype == c.Rep.ACK
        replies = await self.ask(option(c.Opt.GO, info_data(export)))
        assert replies[-1].rtype == c.Rep.ACK, replies
        return replies

    async def simple_reply(self) -> tuple[int, int]:
        """``(error, cookie)`` of a simple reply."""
        magic, error, cookie = c.SIMPLE_REPLY.unpack(await self.receive(c.SIMPLE_REPLY.size))
        assert magic == c.SIMPLE_REPLY_MAGIC, f"not a simple reply: {magic:#x}"
        return error, cookie
