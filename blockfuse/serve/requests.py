"""NBD requests done on a device through the byte bridge, and device errors as NBD errors.

The server core has checked each request against what was advertised (range, flags,
read-only), so here every request is one the device may be asked.  Requests name any
byte range (the minimum block size is 1): reads and writes go through ``DeviceBytes``,
the bridge the FUSE flat file uses, whose range lock orders a partial sector's
read-modify-write against every other write to it.  What changes sectors by a device
call of its own (WRITE_ZEROES that punches) holds the same lock on them::

    WRITE            DeviceBytes.write; FUA: then the device's flush
    READ             DeviceBytes.read; holes as holes where the device finds them cheaply
    FLUSH            this connection's FlushCursor (an error that may have lost
                     acknowledged writes reaches every connection's next FLUSH, once)
    TRIM             discard of the whole sectors inside the range (a hint)
    WRITE_ZEROES     without NO_HOLE on a device that can: write_zeroes (may punch),
                     partial end sectors by read-modify-write; otherwise zeroes written
                     (FAST_ZERO: refused with ENOTSUP instead, nothing changed)
    BLOCK_STATUS     base:allocation from extents() (everything data without them)
    CACHE            nothing (a hint)

FUA flushes through the device, not the cursor: the write fails if the flush does, and
the error stays recorded for every connection's next FLUSH (the errseq rule).

A READ's data goes into a buffer of a ``BufferPool``, shared by the server's connections,
which takes it back once the reply has been written (``written``); why, and the pool's
bounds (``IDLE_BYTES``, ``MIN_POOLED``, ``MAX_POOLED``): ``transport/pool.py``.

A READ of at least ``LEND_MIN`` bytes of whole sectors, on a connection that writes to
a socket, is not read at all where the device lends the range of a file that holds them
(``BlockDevice.lend``, ``FileDevice.lend``: a raw file, a sparse image inside its backing
file, a mirror that reads the range from such a secondary): the transport sends it from
there (``os.sendfile``: no copy in this process; ``transport/writer.py``), and
``written`` gives it back.  Its bytes are read when the
reply is sent (and on a local socket the pages are held until the client reads them),
which is still before the client has its answer: a write made meanwhile ran
concurrently with the READ.  Only ranges all in the page cache are lent (the send runs
in the event loop).  A read error under such a send comes after the reply's header has
gone: that connection is dropped, the device lends no more, and the client's retry gets
the error as a reply.

A READ the device can do at once (``BlockDevice.read_now``: a raw file's page cache,
read with ``RWF_NOWAIT``) is answered by the connection's reader itself, as it parses
the request (``answer_now``), on a connection that writes to a socket: no hand-off to a
task, no trip through the scheduler.  fio 4 KiB random reads at depth 16 from a tmpfs
image cost the server 23.9 µs of CPU per request instead of 30.9 (medians of 3
interleaved rounds, the 2-core dev VM).  So is a WRITE without FUA that the device can
do at once (``BlockDevice.write_now``: a raw file's page cache), while no other write
through the bridge is in flight: then nothing holds the range lock, so no turn is
skipped (``DeviceBytes.write_now``).  A write not done whole at once is awaited in a
task with all its data: writes in flight together have no order, so a second write of
the bytes already written is one the client could have seen anyway.  4 KiB random
writes at depth 16: 63.5 µs per request instead of 74.8.  Anything else, and a request
the device cannot do at once, is awaited in a task (``handle``).

A large WRITE (``transport/splice.py`` says how large) without FUA, on a connection
that reads a socket, need not be received into a buffer at all where the device lends
the range of a file that *is* those sectors (``BlockDevice.lend_writable``,
``FileDevice.lend_writable``: a raw file only, not a sparse image or a mirror, whose
writes do more): ``write_target`` asks for it before the payload is read, and the
transport splices the payload from the socket into the file (one copy instead of two).
Each write into the range holds the sectors it touches in the bridge's range lock
while it runs (``WritableRange.hold``), and a failure to write it is the WRITE's
reply (``write_failed``).

Errors: a ``BlockError``'s errno becomes one of the eight NBD values (``nbd_errno``),
with its message; nothing else escapes ``handle`` (the transport answers an unexpected
exception with EIO).
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable

from ..block import BlockDevice, Capability, Extent, FlushCursor
from ..errors import BlockError, RequestFailed, request_failed
from ..filerange import FileRange
from ..nbd.constants import MAX_STATUS_EXTENTS, STATE_HOLE, STATE_ZERO, Cmd, CmdFlag, Errno
from ..nbd.events import ReadReply, Reply, Request, ServerReply, StatusReply
from ..sectors import DeviceBytes, WritableRange, span
from ..transport.pool import BufferPool
from ..units import ceil_div

ZERO_PIECE = 1 << 20
ZEROES = bytes(ZERO_PIECE)
LEND_MIN = 64 << 10
"""READs this large are sent from the file where they can be (the module text).  Below
it a ``sendfile`` of its own costs more than the copy: smaller replies ready together
leave in one ``writev``."""
MAX_READ_PIECES = 64
"""A READ whose range holds more holes and data than this is sent as data, whole."""

WIRE_ERRNO = {
    errno.EPERM: Errno.EPERM,
    errno.EROFS: Errno.EPERM,
    errno.EACCES: Errno.EPERM,
    errno.EIO: Errno.EIO,
    errno.ENOMEM: Errno.ENOMEM,
    errno.EINVAL: Errno.EINVAL,
    errno.EOPNOTSUPP: Errno.EINVAL,
    errno.ENOSPC: Errno.ENOSPC,
    errno.EDQUOT: Errno.ENOSPC,
    errno.EFBIG: Errno.ENOSPC,
    errno.EOVERFLOW: Errno.EOVERFLOW,
    errno.ESHUTDOWN: Errno.ESHUTDOWN,
}
"""Local errno -> NBD error value (ENOTSUP only ever answers FAST_ZERO); others are EIO."""

Piece = bytes | bytearray | memoryview | int
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = (
    int(f) for f in (CmdFlag.FUA, CmdFlag.NO_HOLE, CmdFlag.DF, CmdFlag.REQ_ONE, CmdFlag.FAST_ZERO)
)
"""The command flags as ints: tested on every request (an IntFlag makes a new enum)."""


def nbd_errno(exc: BlockError) -> int:
    return WIRE_ERRNO.get(exc.errno, Errno.EIO)


class RequestHandler:
    """The requests of one connection on one export."""

    def __init__(
        self,
        bytes_: DeviceBytes,
        structured: bool,
        buffers: BufferPool | None = None,
        *,
        sends_files: bool = False,
    ) -> None:
        self._bytes = bytes_
        self._device = bytes_.device
        self._structured = structured
        self._cursor = FlushCursor(bytes_.device)
        self._buffers = buffers or BufferPool(0)
        direct = bytes_.device.unchecked  # without safe's checks: ``_lend`` makes them
        lends = type(direct).lend is not BlockDevice.lend
        self._lender = direct if sends_files and lends else None
        """The device asked to lend large READs' ranges (the module text): one that can,
        on a connection that can send them."""
        self._reads_now = type(direct).read_now is not BlockDevice.read_now
        """Whether a READ may be answered at once (``answer_now``)."""
        self._writes_now = type(direct).write_now is not BlockDevice.write_now
        """Whether a WRITE may be answered at once (``answer_now``)."""
        lends_writable = type(direct).lend_writable is not BlockDevice.lend_writable
        self._writes_into_files = sends_files and lends_writable
        """Whether a large WRITE's payload may go from the socket into the file
        (``write_target``)."""
        self._lent: dict[int, bytearray | FileRange] = {}
        """id(reply) -> the pooled buffer its data is in, or the range lent for it, until
        ``written``."""
        self._commands: dict[int, Callable[[Request], Awaitable[ServerReply]]] = {
            Cmd.READ: self._read,
            Cmd.WRITE: self._write,
            Cmd.FLUSH: self._flush,
            Cmd.TRIM: self._trim,
            Cmd.CACHE: self._cache,
            Cmd.WRITE_ZEROES: self._write_zeroes,
            Cmd.BLOCK_STATUS: self._block_status,
        }

    async def handle(self, req: Request) -> ServerReply:
        try:
            return await self._commands[req.cmd](req)
        except BlockError as exc:
            self._bytes.note_error(
                f"NBD {Cmd(req.cmd).name} of {req.length} bytes at {req.offset}", exc
            )
            if req.cmd == Cmd.READ:
                return ReadReply(req.cookie, req.offset, (), nbd_errno(exc), str(exc), req.offset)
            return Reply(req.cookie, nbd_errno(exc), str(exc))

    def answer_now(self, req: Request) -> ServerReply | None:
        """The reply to ``req`` made at once, without waiting (a READ of data a file holds
        in its page cache, a WRITE into it), or ``None``: ``handle`` answers it."""
        if req.cmd == Cmd.READ and self._reads_now:
            return self._read_now(req)
        if req.cmd == Cmd.WRITE and self._writes_now and not req.flags & FUA:
            return self._write_now(req)
        return None

    def _read_now(self, req: Request) -> ReadReply | None:
        if self._lender is not None and req.length >= LEND_MIN:
            return None
        if self._reads_pieces(req):
            return None
        buf = self._buffers.take(req.length)
        data = self._bytes.read_now(req.offset, req.length, buf)
        if data is None:
            if buf is not None:
                self._buffers.give_back(buf)
            return None
        return self._data_reply(req, data, buf)

    def _write_now(self, req: Request) -> Reply | None:
        done = self._bytes.write_now(req.offset, memoryview(req.data))
        return Reply(req.cookie) if done else None

    async def write_target(self, req: Request) -> WritableRange | None:
        """Where the payload of ``req`` (a WRITE whose payload has not come yet) may be
        written straight from the socket (the module text), until released; or
        ``None``: it is received and ``handle``d as usual."""
        if not self._writes_into_files or req.flags & FUA:
            return None
        return await self._bytes.lend_writable(req.offset, req.length)

    def write_failed(self, req: Request, exc: OSError) -> Reply:
        """The reply to a WRITE whose payload failed to go into its ``write_target``."""
        error = request_failed(exc, f"write {req.length} bytes at byte {req.offset}")
        self._bytes.note_error(f"NBD WRITE of {req.length} bytes at {req.offset}", error)
        return Reply(req.cookie, nbd_errno(error), str(error))

    def written(self, reply: ServerReply) -> None:
        """``reply`` has been written (or never will be): its buffer may be used again."""
        lent = self._lent.pop(id(reply), None)
        if isinstance(lent, FileRange):
            lent.release()
        elif lent is not None:
            self._buffers.give_back(lent)

    async def _done(self, req: Request) -> Reply:
        """Success; with FUA once the device's flush says it is durable."""
        if req.flags & FUA:
            await self._device.flush()
        return Reply(req.cookie)

    # --- data -----------------------------------------------------------------------------

    async def _read(self, req: Request) -> ReadReply:
        if self._reads_pieces(req):
            return await self._read_pieces(req)
        if self._lender is not None and req.length >= LEND_MIN:
            lent = await self._lend(self._lender, req.offset, req.length)
            if lent is not None:
                lent_reply = ReadReply(req.cookie, req.offset, (lent,))
                self._lent[id(lent_reply)] = lent
                return lent_reply
        buf = self._buffers.take(req.length)  # on failure it is dropped, not given back:
        data = await self._read_exactly(req.offset, req.length, buf)  # a device may hold it
        return self._data_reply(req, data, buf)

    def _data_reply(self, req: Request, data: memoryview, buf: bytearray | None) -> ReadReply:
        """``data`` as the READ's reply; ``buf``, the pooled buffer it is in, until sent."""
        reply = ReadReply(req.cookie, req.offset, (data,))
        if buf is not None:
            self._lent[id(reply)] = buf
        return reply

    async def _lend(self, lender: BlockDevice, offset: int, length: int) -> FileRange | None:
        """The range lent for whole sectors (``None``: a part sector, or not lent)."""
        ss = (await self._bytes.info()).sector_size
        if offset % ss or length % ss:
            return None
        return lender.lend(offset // ss, length // ss)

    async def _read_exactly(
        self, offset: int, length: int, into: bytearray | None = None
    ) -> memoryview:
        data = await self._bytes.read(offset, length, into)
        if len(data) < length:
            raise RequestFailed(errno.EIO, f"the device shrank below byte {offset + length}")
        return data

    def _reads_pieces(self, req: Request) -> bool:
        """Whether the READ is answered as data and holes (``_read_pieces``)."""
        return not req.flags & DF and self._finds_holes_cheaply()

    def _finds_holes_cheaply(self) -> bool:
        dev = self._device
        return self._structured and dev.cheap_extents and Capability.EXTENTS in dev.capabilities

    async def _read_pieces(self, req: Request) -> ReadReply:
        """Data and holes as the device reports them, covering the whole range; after a
        failure, what came before."""
        pieces: list[Piece] = []
        at = req.offset
        runs = await self._byte_runs(req.offset, req.length, MAX_READ_PIECES)
        if len(runs) >= MAX_READ_PIECES:
            runs = [(req.length, True)]
        for length, is_data in covering(runs, req.length):
            try:
                pieces.append(await self._read_exactly(at, length) if is_data else length)
            except BlockError as exc:
                return ReadReply(
                    req.cookie, req.offset, tuple(pieces), nbd_errno(exc), str(exc), at
                )
            at += length
        return ReadReply(req.cookie, req.offset, tuple(pieces))

    async def _write(self, req: Request) -> Reply:
        if await self._bytes.write(req.offset, memoryview(req.data)) < req.length:
            raise RequestFailed(errno.ENOSPC, f"the device shrank below byte {req.end}")
        return await self._done(req)

    async def _flush(self, req: Request) -> Reply:
        await self._cursor.flush()
        return Reply(req.cookie)

    async def _cache(self, req: Request) -> Reply:
        return Reply(req.cookie)

    # --- holes ----------------------------------------------------------------------------

    def _whole_sectors(self, offset: int, length: int, ss: int) -> tuple[int, int]:
        """``[first, end)``: the sectors lying wholly inside the byte range."""
        return ceil_div(offset, ss), (offset + length) // ss

    async def _trim(self, req: Request) -> Reply:
        ss = (await self._bytes.info()).sector_size
        first, end = self._whole_sectors(req.offset, req.length, ss)
        if end > first:
            await self._device.discard(first, end - first)
        return await self._done(req)

    async def _write_zeroes(self, req: Request) -> Reply:
        punch = Capability.WRITE_ZEROES in self._device.capabilities
        punch = punch and not req.flags & NO_HOLE
        if req.flags & FAST_ZERO and not punch:
            return Reply(req.cookie, Errno.ENOTSUP, "this device cannot zero faster than writing")
        ss = (await self._bytes.info()).sector_size
        first, end = self._whole_sectors(req.offset, req.length, ss)
        if not punch or end <= first:
            await self._write_zero_bytes(req.offset, req.length)
            return await self._done(req)
        await self._write_zero_bytes(req.offset, first * ss - req.offset)
        async with self._bytes.holding(first, end):
            await self._device.write_zeroes(first, end - first)
        await self._write_zero_bytes(end * ss, req.end - end * ss)
        return await self._done(req)

    async def _write_zero_bytes(self, offset: int, length: int) -> None:
        while length > 0:
            n = min(length, ZERO_PIECE)
            await self._bytes.write(offset, memoryview(ZEROES)[:n])
            offset, length = offset + n, length - n

    # --- block status ---------------------------------------------------------------------

    async def _block_status(self, req: Request) -> StatusReply:
        limit = 1 if req.flags & REQ_ONE else MAX_STATUS_EXTENTS
        runs = await self._byte_runs(req.offset, req.length, limit)
        flags = {True: 0, False: STATE_HOLE | STATE_ZERO}
        return StatusReply(req.cookie, tuple((n, flags[is_data]) for n, is_data in runs[:limit]))

    async def _byte_runs(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        """``(length, is_data)`` runs from ``offset`` on, at most ``limit`` (the last may
        end before ``offset + length``: a caller asks again); all data without extents."""
        if Capability.EXTENTS not in self._device.capabilities:
            return [(length, True)]
        ss = (await self._bytes.info()).sector_size
        s = span(offset, length, ss)
        found = await self._device.extents(s.first, s.count)
        return byte_runs(found, offset, offset + length, ss, limit) or [(length, True)]


def covering(runs: list[tuple[int, bool]], length: int) -> list[tuple[int, bool]]:
    """``runs`` and, if they end short of ``length`` bytes, the rest as data: what the
    extents left unsaid is read, never assumed a hole."""
    rest = length - sum(n for n, _ in runs)
    return [*runs, (rest, True)] if rest > 0 else runs


def byte_runs(
    found: list[Extent], start: int, end: int, ss: int, limit: int
) -> list[tuple[int, bool]]:
    """Sector extents as ``(length, is_data)`` runs of bytes inside ``[start, end)``, in
    order from ``start``, neighbours of one kind merged; they stop at the first gap."""
    out: list[tuple[int, bool]] = []
    at = start
    for extent in found:
        lo, hi = max(extent.sector * ss, at), min(extent.end * ss, end)
        if lo != at or hi <= lo:
            if lo > at:
                break  # a gap: what follows is not known to start here
            continue
        if out and out[-1][1] == extent.is_data:
            out[-1] = (out[-1][0] + hi - lo, extent.is_data)
        elif len(out) == limit:
            break
        else:
            out.append((hi - lo, extent.is_data))
        at = hi
        if at >= end:
            break
    return out
