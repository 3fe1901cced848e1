"""A scriptable misbehaving NBD server: the peer for the tests of the client's limits.

No real server can be made to stall half-way through a reply, flood the handshake with
META_CONTEXT replies or advertise block sizes the spec forbids, so this one does what a
``Script`` says, in raw bytes, and counts what the client did::

    hostile = Hostile(Script(stall=Stall.DURING, stall_from=2))
    client_end, server_end = trio.testing.memory_stream_pair()
    nursery.start_soon(hostile.handle, server_end)          # one connection, in-process

    python -m tests.hostile_nbd SOCKET '{"stall": "during"}'   # its own process (mount tests)

Everything it does not misbehave in is plain NBD: fixed newstyle, structured replies
(unless told otherwise), ``base:allocation``, a sparse disk that keeps what is written.
Stalls last until ``Hostile.release`` is set (in-process) or forever (a process), with the
connection held open and unread, so the client's own sends back up too.
"""

from __future__ import annotations

import enum
import json
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Self

import trio

from blockfuse.nbd import constants as c

from .nbdpair import FULL_FLAGS

BLOCK = 4096


class Stall(enum.Enum):
    BEFORE = "before"
    """Read request ``stall_from`` and never answer it (nor anything after it)."""
    DURING = "during"
    """Send the reply's header and half its payload, then nothing more."""
    AFTER = "after"
    """Answer request ``stall_from`` whole, then neither read nor answer anything more."""


@dataclass
class Script:
    """What the server does; every field has the well-behaved default."""

    greet_connections: int | None = None
    """Greet only this many connections; later ones are accepted and never greeted."""
    greet_delay: float = 0.0
    """Seconds to wait before greeting each connection after the first."""
    size: int = 1 << 20
    flags: int = int(FULL_FLAGS)
    structured: bool = True
    block_size: tuple[int, int, int] | None = None
    """``NBD_INFO_BLOCK_SIZE`` (minimum, preferred, maximum) to advertise, checked or not."""
    meta_contexts: int = 1
    """META_CONTEXT replies to SET_META_CONTEXT: the first is ``base:allocation``, the
    rest are contexts nobody asked for, with names ``meta_name_len`` bytes long."""
    meta_name_len: int = 64
    exports: list[tuple[str, str]] = field(default_factory=lambda: [("disk", "")])
    """(name, description) of each export LIST shows; INFO/GO accept any name."""
    info_flood: int = 0
    """Extra INFO replies (a ``MAX_STRING``-byte description each) per INFO and GO."""
    trailing: bytes = b""
    """Bytes sent in the same write as the handshake's last reply."""
    stall: Stall | None = None
    stall_from: int = 1
    """The request (counted from 1 on each connection) where the stall starts; 0 with
    ``AFTER``: right after the handshake, before reading any request."""
    stall_on: list[int] | None = None
    """The connections (counted from 1) that stall; None: every one."""
    close_every: int = 0
    """Close the connection instead of answering every Nth request (over all connections)."""
    drop_connections: int = 0
    """Close each of the first this-many connections at its first request."""
    reply_delay: float = 0.0
    """Seconds to wait before each reply."""
    one_byte_chunks: bool = False
    """Answer READs with 1-byte DATA chunks: every even offset first, then the odd ones."""

    @classmethod
    def from_json(cls, text: str) -> Script:
        """A script from JSON (``trailing`` as a latin-1 string); unknown keys are refused."""
        raw = json.loads(text)
        if "stall" in raw:
            raw["stall"] = Stall(raw["stall"])
        if "trailing" in raw:
            raw["trailing"] = raw["trailing"].encode("latin-1")
        if raw.get("block_size") is not None:
            raw["block_size"] = tuple(raw["block_size"])
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown script keys: {sorted(unknown)}")
        return cls(**raw)


class Closed(Exception):
    """The script (or the client) ended the connection."""


class Hostile:
    """The server: ``handle(stream)`` serves one connection by the script."""

    def __init__(self, script: Script | None = None, *, log_stalls: bool = False) -> None:
        self.script = script or Script()
        self._log_stalls = log_stalls
        self.disk: dict[int, bytearray] = {}
        self.connections = 0
        self.requests = 0
        self.disconnects = 0
        self.disconnected = trio.Event()
        """Set at the first NBD_CMD_DISC."""
        self.stalled = trio.Event()
        """Set when a stall begins (the test then knows the client is waiting)."""
        self.release = trio.Event()
        """Set by the test to end every stall (the stalled connection is then closed)."""

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        number = self.connections
        try:
            async with stream:
                greet = self.script.greet_connections
                if greet is not None and number > greet:
                    await self._stall()
                    return
                if number > 1:
                    await trio.sleep(self.script.greet_delay)
                conn = _Connection(self, stream, number)
                await conn.handshake()
                await conn.transmission()
        except (Closed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _stall(self) -> None:
        self.stalled.set()
        if self._log_stalls:
            print(STALLED, file=sys.stderr, flush=True)
        await self.release.wait()

    # --- the disk ---------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        while len(out) < length:
            pos = offset + len(out)
            block, start = divmod(pos, BLOCK)
            n = min(BLOCK - start, length - len(out))
            data = self.disk.get(block)
            out += data[start : start + n] if data is not None else bytes(n)
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        done = 0
        while done < len(data):
            block, start = divmod(offset + done, BLOCK)
            n = min(BLOCK - start, len(data) - done)
            self.disk.setdefault(block, bytearray(BLOCK))[start : start + n] = data[done : done + n]
            done += n


class _Connection:
    def __init__(self, server: Hostile, stream: trio.abc.Stream, number: int) -> None:
        self.server = server
        self.script = server.script
        self.stream = stream
        self.number = number
        self.buf = bytearray()
        self.structured = False
        self.requests = 0

    async def receive(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = await self.stream.receive_some(1 << 16)
            if not data:
                raise Closed
            self.buf += data
        out, self.buf = bytes(self.buf[:n]), self.buf[n:]
        return out

    # --- handshake --------------------------------------------------------------------

    async def handshake(self) -> None:
        flags = c.HandshakeFlag.FIXED_NEWSTYLE | c.HandshakeFlag.NO_ZEROES
        await self.stream.send_all(c.GREETING.pack(c.NBDMAGIC, c.IHAVEOPT, flags))
        await self.receive(c.CLIENT_FLAGS.size)
        while True:
            _, option, length = c.OPTION.unpack(await self.receive(c.OPTION.size))
            data = await self.receive(length)
            out = bytearray()
            if option == c.Opt.ABORT:
                await self.stream.send_all(reply(option, c.Rep.ACK))
                raise Closed
            if self.option(option, data, out):
                await self.stream.send_all(bytes(out) + self.script.trailing)
                return
            await self.stream.send_all(bytes(out))

    def option(self, option: int, data: bytes, out: bytearray) -> bool:
        """Answer one option into ``out``; True when transmission starts."""
        if option == c.Opt.STRUCTURED_REPLY:
            self.structured = self.script.structured
            out += reply(option, c.Rep.ACK if self.structured else c.Rep.ERR_UNSUP)
        elif option == c.Opt.SET_META_CONTEXT and self.structured:
            self.meta_contexts(out)
        elif option == c.Opt.LIST:
            for name, desc in self.script.exports:
                raw = name.encode()
                out += reply(option, c.Rep.SERVER, c.U32.pack(len(raw)) + raw + desc.encode())
            out += reply(option, c.Rep.ACK)
        elif option in (c.Opt.INFO, c.Opt.GO):
            self.info(option, data, out)
            return option == c.Opt.GO
        elif option == c.Opt.EXPORT_NAME:
            out += c.EXPORT_NAME_REPLY.pack(self.script.size, self.script.flags)
            return True
        else:
            out += reply(option, c.Rep.ERR_UNSUP)
        return False

    def meta_contexts(self, out: bytearray) -> None:
        opt = c.Opt.SET_META_CONTEXT
        for i in range(self.script.meta_contexts):
            name = (
                c.BASE_ALLOCATION
                if i == 0
                else f"x-hostile:{i}".ljust(self.script.meta_name_len, "x")
            )
            out += reply(opt, c.Rep.META_CONTEXT, c.U32.pack(i + 1) + name.encode())
        out += reply(opt, c.Rep.ACK)

    def info(self, option: int, data: bytes, out: bytearray) -> None:
        (n,) = c.U32.unpack(data[:4])
        name = data[4 : 4 + n].decode(errors="replace")
        desc = dict(self.script.exports).get(name, "")
        out += reply(option, c.Rep.INFO, c.INFO_EXPORT.pack(c.InfoType.EXPORT, self.script.size,
                                                           self.script.flags))  # fmt: skip
        if self.script.block_size is not None:
            sizes = c.INFO_BLOCK_SIZE.pack(c.InfoType.BLOCK_SIZE, *self.script.block_size)
            out += reply(option, c.Rep.INFO, sizes)
        if desc:
            out += reply(option, c.Rep.INFO, c.U16.pack(c.InfoType.DESCRIPTION) + desc.encode())
        for _ in range(self.script.info_flood):
            flood = c.U16.pack(c.InfoType.DESCRIPTION) + b"d" * c.MAX_STRING
            out += reply(option, c.Rep.INFO, flood)
        out += reply(option, c.Rep.ACK)

    # --- transmission -----------------------------------------------------------------

    async def transmission(self) -> None:
        if self.stalls_now() is Stall.AFTER:  # stall_from=0: read nothing at all
            await self.server._stall()
            raise Closed
        while True:
            raw = await self.receive(c.REQUEST.size)
            _, _, cmd, cookie, offset, length = c.REQUEST.unpack(raw)
            payload = await self.receive(length) if cmd == c.Cmd.WRITE else b""
            if cmd == c.Cmd.DISC:
                self.server.disconnects += 1
                self.server.disconnected.set()
                return
            self.requests += 1
            self.server.requests += 1
            every = self.script.close_every
            if every and self.server.requests % every == 0:
                return
            if self.number <= self.script.drop_connections:
                return
            await trio.sleep(self.script.reply_delay)
            await self.answer(cmd, cookie, offset, length, payload)

    def stalls_now(self) -> Stall | None:
        s = self.script
        if s.stall is None or self.requests < s.stall_from:
            return None
        if s.stall_on is not None and self.number not in s.stall_on:
            return None
        return s.stall

    async def answer(self, cmd: int, cookie: int, offset: int, length: int, data: bytes) -> None:
        stall = self.stalls_now()
        if stall is Stall.BEFORE:
            await self.server._stall()
            raise Closed
        if cmd == c.Cmd.WRITE:
            self.server.write(offset, data)
        out = self.reply(cmd, cookie, offset, length)
        if stall is Stall.DURING:
            await self.stream.send_all(out[: c.SIMPLE_REPLY.size + max(length // 2, 1)])
            await self.server._stall()
            raise Closed
        await self.stream.send_all(out)
        if stall is Stall.AFTER:
            await self.server._stall()
            raise Closed

    def reply(self, cmd: int, cookie: int, offset: int, length: int) -> bytes:
        if cmd == c.Cmd.BLOCK_STATUS and self.structured:
            status = c.U32.pack(1) + c.EXTENT.pack(length, 0)
            return chunk(cookie, c.Chunk.BLOCK_STATUS, status, done=True)
        if cmd != c.Cmd.READ:
            return c.SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, 0, cookie)
        data = self.server.read(offset, length)
        if not self.structured:
            return c.SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, 0, cookie) + data
        if self.script.one_byte_chunks:
            return one_byte_chunks(cookie, offset, data)
        return chunk(cookie, c.Chunk.OFFSET_DATA, c.U64.pack(offset) + data, done=True)


def reply(option: int, rtype: int, data: bytes = b"") -> bytes:
    return c.OPTION_REPLY.pack(c.OPTION_REPLY_MAGIC, option, rtype, len(data)) + data


def chunk(cookie: int, ctype: int, payload: bytes, *, done: bool = False) -> bytes:
    flags = c.REPLY_FLAG_DONE if done else 0
    header = c.CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, flags, ctype, cookie, len(payload))
    return header + payload


def one_byte_chunks(cookie: int, offset: int, data: bytes) -> bytes:
    order = [*range(0, len(data), 2), *range(1, len(data), 2)]
    parts = [
        chunk(cookie, c.Chunk.OFFSET_DATA, c.U64.pack(offset + i) + data[i : i + 1]) for i in order
    ]
    return b"".join(parts) + chunk(cookie, c.Chunk.NONE, b"", done=True)


# --- as a process ---------------------------------------------------------------------


READY = "hostile NBD server ready"
STALLED = "hostile NBD server stalls"


async def serve_unix(
    path: str,
    script: Script,
    max_connections: int | None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on a Unix socket; after ``max_connections`` the socket is closed and removed
    (later connections are refused, as a one-session ``nbd-server -d`` refuses them).
    Prints ``READY`` (and reports ``started``) once it listens."""
    hostile = Hostile(script, log_stalls=True)
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(path)
    listener.listen(16)
    print(READY, flush=True)
    task_status.started()
    served = 0
    async with trio.open_nursery() as nursery:
        while max_connections is None or served < max_connections:
            sock, _ = await listener.accept()
            served += 1
            nursery.start_soon(hostile.handle, trio.SocketStream(sock))
        listener.close()
        os.unlink(path)


class HostileProcess:
    """``python -m tests.hostile_nbd`` on ``directory/hostile.sock``, for tests whose client
    runs in another process (a mount, ``blockfuse ls``); ``stop()`` ends it by PID, as
    does the end of a ``with HostileProcess(...) as server:`` block."""

    def __init__(
        self, directory: Path, script: dict[str, object], max_connections: int | None = None
    ) -> None:
        self.path = str(directory / "hostile.sock")
        argv = [sys.executable, "-m", "tests.hostile_nbd", self.path, json.dumps(script)]
        if max_connections is not None:
            argv.append(str(max_connections))
        self.log = directory / "hostile.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, stdout=subprocess.PIPE, stderr=log, start_new_session=True
            )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline().decode() if ready else ""
        if READY not in line:
            self.stop()
            raise AssertionError(f"the hostile server did not start: {self.log.read_text()}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.path}"

    def stalls(self) -> int:
        """How many stalls have begun so far."""
        return self.log.read_text(errors="replace").count(STALLED)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> None:
    """``python -m tests.hostile_nbd SOCKET [SCRIPT_JSON] [MAX_CONNECTIONS]``"""
    path = argv[0]
    script = Script.from_json(argv[1]) if len(argv) > 1 else Script()
    most = int(argv[2]) if len(argv) > 2 else None
    trio.run(serve_unix, path, script, most)


if __name__ == "__main__":
    main(sys.argv[1:])
