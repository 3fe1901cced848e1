"""An NBD export as a device (the seed's NBD client, made to the protocol spec).

Geometry comes from the first connection: the sector size is the server's minimum block
size, but at least 512 bytes; a few trailing bytes that do not fill a sector are out of
reach.  Capabilities follow what the server advertised: TRIM -> discard, WRITE_ZEROES ->
write_zeroes, ``base:allocation`` block status -> extents.  A read-only export is a
read-only device.  Each call goes through ``Reconnecting`` (see transport/reconnect.py):
it is answered within ``request_timeout`` seconds (30 by default), or fails with
ETIMEDOUT; a dropped connection is re-established and the request retried within that
time (a flush then fails with EIO if acknowledged writes may have been lost with the old
connection); a server's error reply is that request's ``RequestFailed(errno)`` and the
connection lives on.  Block status becomes sector extents by ``to_extents`` (its text
has the rule and a diagram).  An ``nbds`` export is reached over TLS on every connection,
reconnects included, with the certificates read when the device was opened; the status
says so, with the server certificate's subject.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from ..block import SECTOR_SIZE, BlockDevice, Buffer, Capability, Extent, Info
from ..errors import Disconnected, ProtocolError, ReadOnly, RequestFailed, Unreachable, Unsafe
from ..nbd.constants import STATE_ZERO, TxFlag
from ..nbd.uri import Address
from ..transport.blocking import Plane
from ..transport.client import DEFAULT_TIMEOUT, NBDClient
from ..transport.connect import connect_nbd, tls_for
from ..transport.reconnect import Reconnecting, clipped
from ..transport.tls import TLSStream
from ..units import round_down, round_up
from .holes import append_extent

__all__ = ["DEFAULT_TIMEOUT", "MAX_TIMEOUT", "RemoteDevice", "open_remote"]

MAX_TIMEOUT = 86400.0
"""The longest ``timeout=`` a spec may give (a day): longer is a typo, not a wish."""


class RemoteDevice(BlockDevice):
    kind = "nbd"

    def __init__(self, link: Reconnecting, address: Address) -> None:
        self._link = link
        self.address = address
        export = link.client.export
        self._read_only = export.read_only
        self._sector_size = max(SECTOR_SIZE, export.min_block)
        self._size_sectors = (export.size or 0) // self._sector_size
        self.capabilities = capabilities_of(link.client)
        self._flushable = link.client.can(TxFlag.SEND_FLUSH)
        self._closed = False

    async def get_info(self) -> Info:
        self._check_open()
        return Info(not self._read_only, self._sector_size, self._size_sectors)

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        self._check_open()
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        if any(v.readonly for v in views):
            raise Unsafe("read() needs writable buffers")
        if views:
            offset = sector * self._sector_size
            what = f"read of {sum(map(len, views))} bytes at {offset}"
            await self._link.run(lambda c: c.preadv(views, offset), what)

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        self._check_writable()
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        if views:
            offset = sector * self._sector_size
            what = f"write of {sum(map(len, views))} bytes at {offset}"
            await self._link.run(lambda c: c.pwritev(views, offset), what)

    async def flush(self) -> None:
        """NBD_CMD_FLUSH.  A failure that means acknowledged writes may be lost (the
        server's error, or writes acknowledged on a lost connection) is recorded in
        ``write_errors`` for every caller; one that could not reach the server is not."""
        self._check_open()
        if self._flushable and not self._read_only:
            try:
                await self._link.flush()
            except Unreachable:
                raise
            except (RequestFailed, ProtocolError) as exc:
                self.write_errors.record(exc)
                raise

    async def discard(self, sector: int, count: int) -> None:
        if Capability.DISCARD not in self.capabilities:
            await super().discard(sector, count)
        self._check_writable()
        ss = self._sector_size
        what = f"trim of {count * ss} bytes at {sector * ss}"
        await self._link.run(lambda c: c.trim(sector * ss, count * ss), what)

    async def write_zeroes(self, sector: int, count: int) -> None:
        if Capability.WRITE_ZEROES not in self.capabilities:
            await super().write_zeroes(sector, count)
        self._check_writable()
        ss = self._sector_size
        what = f"write-zeroes of {count * ss} bytes at {sector * ss}"
        await self._link.run(lambda c: c.zero(sector * ss, count * ss), what)

    async def extents(self, sector: int, count: int) -> list[Extent]:
        if Capability.EXTENTS not in self.capabilities:
            return await super().extents(sector, count)
        self._check_open()
        ss = self._sector_size
        what = f"block status of {count * ss} bytes at {sector * ss}"
        found = await self._link.run(lambda c: c.block_status(sector * ss, count * ss), what)
        return to_extents(found, sector, count, ss)

    def data_plane(self) -> Plane | None:
        """Blocking connections for worker threads to read this export in bulk (a mirror's
        copy), if the server lets several connections read it (``CAN_MULTI_CONN``) and
        the connection is not TLS."""
        export = self._link.client.export
        if not Plane.allowed(self.address, export):
            return None
        return Plane(self.address, export, self._link.timeout)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._link.aclose()

    def status(self) -> dict[str, str]:
        return {
            "remote": str(self.address),
            "connection": self._connection(),
            "reconnects": str(self._link.reconnects),
        }

    def _connection(self) -> str:
        """The link's state; while connected over TLS, ``connected; tls TLSv1.3, peer
        CN=...`` and then the rest (reconnects, the last failure)."""
        state = self._link.state()
        stream = self._link.client.stream
        head, sep, rest = state.partition("; ")
        if head != "connected" or not isinstance(stream, TLSStream):
            return state
        return f"{head}; {clipped(stream.describe())}{sep}{rest}"

    def _check_open(self) -> None:
        if self._closed:
            raise Disconnected(f"{self.address} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._read_only:
            raise ReadOnly(f"export {self.address.export!r} on {self.address.server} is read-only")


def capabilities_of(client: NBDClient) -> frozenset[Capability]:
    caps = set()
    if not client.export.read_only:
        if client.can(TxFlag.SEND_TRIM):
            caps.add(Capability.DISCARD)
        if client.can(TxFlag.SEND_WRITE_ZEROES):
            caps.add(Capability.WRITE_ZEROES)
    if client.has_block_status:
        caps.add(Capability.EXTENTS)
    return frozenset(caps)


def to_extents(found: list[tuple[int, int]], sector: int, count: int, ss: int) -> list[Extent]:
    """Block status ``(length, flags)`` from byte ``sector * ss`` as sector extents.

    The server's extents are in bytes and may end anywhere; ours are whole sectors of
    ``ss`` bytes.  A sector may be called a hole only if every byte of it is known to
    read as zeroes (a mirror skips holes: calling data a hole loses it); anything else is
    data, which is always safe (at worst zeroes are copied).  So, after merging
    neighbours of the same kind into runs::

        sectors   |  0  |  1  |  2  |  3  |  4  |  5  |  6  |  7  |  8  |  9  |
        bytes     |zero................|data.......|zero.............|   (the server stopped)
        answer    |hole.............|data.............|hole.......|data.|

    Sectors 0-2 lie wholly in the first zero run: a hole.  Sector 3 holds its last bytes
    and the data run's first: data, as is every sector the data run touches (3-5).
    Sectors 6-7 lie wholly in the second zero run: a hole.  Sector 8 holds zeroes, then
    bytes the server said nothing about: data.  Sector 9 is left for the caller to ask
    again.

    A zero run gives the sectors wholly inside it as a hole, then the sector its end
    falls in (if inside one) as data; a data run gives every sector it touches as data.
    The answer is clipped to the ``count`` sectors asked for, stops where the server's
    answer stops (the caller asks again from there), and is at least one sector long.
    """
    out: list[Extent] = []
    pos = first = sector * ss  # the end of what ``out`` describes, a sector boundary
    end = (sector + count) * ss
    for run_end, zero in merged_runs(found, first):
        if pos >= end:
            break
        if zero and round_down(run_end, ss) > pos:
            pos = add_run(out, pos, min(round_down(run_end, ss), end), ss, is_data=False)
        if round_up(run_end, ss) > pos and pos < end:
            pos = add_run(out, pos, min(round_up(run_end, ss), end), ss, is_data=True)
    if not out:
        out.append(Extent(sector, 1, True))
    return out


def merged_runs(found: list[tuple[int, int]], start: int) -> list[tuple[int, bool]]:
    """``(end byte, reads as zeroes)`` of each run of same-kind extents from ``start``."""
    runs: list[tuple[int, bool]] = []
    pos = start
    for length, flags in found:
        pos += length
        zero = bool(flags & STATE_ZERO)
        if runs and runs[-1][1] == zero:
            runs[-1] = (pos, zero)
        else:
            runs.append((pos, zero))
    return runs


def add_run(out: list[Extent], start: int, stop: int, ss: int, *, is_data: bool) -> int:
    """Append sectors ``[start, stop)`` (bytes, sector-aligned); the new end."""
    append_extent(out, Extent(start // ss, (stop - start) // ss, is_data))
    return stop


async def open_remote(
    nursery: trio.Nursery,
    address: Address,
    *,
    retries: int = 5,
    backoff: float = 0.1,
    request_timeout: float = DEFAULT_TIMEOUT,
) -> RemoteDevice:
    """Connect to ``address``; the connection's reader task (and reconnects) run in ``nursery``.

    ``request_timeout`` bounds every request, with its reconnects (see
    transport/reconnect.py), and the first connection.  Raises ``ConnectionLost`` (cannot connect),
    ``HandshakeRefused`` (no such export, ...) or ``ProtocolError``: the first connection
    is not retried, so a typo fails at once.  An ``nbds`` address reads its certificates
    now (``TLSFailed`` if they are unusable); every connection speaks TLS with them.
    """

    tls = tls_for(address)

    async def connect(n: trio.Nursery) -> NBDClient:
        return await connect_nbd(n, address, request_timeout=request_timeout, tls=tls)

    first = await connect(nursery)
    link = Reconnecting(nursery, connect, first, retries=retries, backoff=backoff)
    return RemoteDevice(link, address)
