"""An NBD export as a device (the seed's NBD client, made to the protocol spec).

Geometry comes from the first connection: the sector size is the server's minimum block
size, but at least 512 bytes; a few trailing bytes that do not fill a sector are out of
reach.  Capabilities follow what the server advertised: TRIM -> discard, WRITE_ZEROES ->
write_zeroes, ``base:allocation`` block status -> extents.  A read-only export is a
read-only device.  Each call goes through ``Reconnecting`` (see transport/reconnect.py):
a dropped connection is re-established and the request retried (a flush then fails
with EIO if acknowledged writes may have been lost with the old connection); a server's
error reply is that request's ``RequestFailed(errno)`` and the connection lives on.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from ..block import SECTOR_SIZE, BlockDevice, Buffer, Capability, Extent, Info
from ..errors import Disconnected, ReadOnly, Unsafe
from ..nbd.constants import STATE_ZERO, TxFlag
from ..nbd.uri import Address
from ..transport.client import DEFAULT_TIMEOUT, NBDClient
from ..transport.connect import connect_nbd
from ..transport.reconnect import Reconnecting

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
            await self._link.run(lambda c, d: c.preadv(views, offset, deadline=d), what)

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        self._check_writable()
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        if views:
            offset = sector * self._sector_size
            what = f"write of {sum(map(len, views))} bytes at {offset}"
            await self._link.run(lambda c, d: c.pwritev(views, offset, deadline=d), what)

    async def flush(self) -> None:
        self._check_open()
        if self._flushable and not self._read_only:
            await self._link.flush()

    async def discard(self, sector: int, count: int) -> None:
        if Capability.DISCARD not in self.capabilities:
            await super().discard(sector, count)
        self._check_writable()
        ss = self._sector_size
        what = f"trim of {count * ss} bytes at {sector * ss}"
        await self._link.run(lambda c, d: c.trim(sector * ss, count * ss, deadline=d), what)

    async def write_zeroes(self, sector: int, count: int) -> None:
        if Capability.WRITE_ZEROES not in self.capabilities:
            await super().write_zeroes(sector, count)
        self._check_writable()
        ss = self._sector_size
        what = f"write-zeroes of {count * ss} bytes at {sector * ss}"
        await self._link.run(lambda c, d: c.zero(sector * ss, count * ss, deadline=d), what)

    async def extents(self, sector: int, count: int) -> list[Extent]:
        if Capability.EXTENTS not in self.capabilities:
            return await super().extents(sector, count)
        self._check_open()
        ss = self._sector_size
        what = f"block status of {count * ss} bytes at {sector * ss}"
        found = await self._link.run(
            lambda c, d: c.block_status(sector * ss, count * ss, deadline=d), what
        )
        return to_extents(found, sector, count, ss)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._link.aclose()

    def status(self) -> dict[str, str]:
        out = {"remote": str(self.address), "connection": self._link.state()}
        if self._link.reconnects:
            out["reconnects"] = str(self._link.reconnects)
        return out

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
    """Byte extents ``(length, flags)`` from ``sector`` as sector extents within the range.

    A boundary inside a sector makes that sector data (reading it is always safe); runs
    of the same kind merge; at least one sector is always answered.
    """
    out: list[Extent] = []
    pos = real = sector * ss
    end = (sector + count) * ss
    for length, flags in found:
        real += length
        if pos >= end:
            break
        stop = min(end, -(-real // ss) * ss)
        if stop <= pos:
            continue
        is_data = not flags & STATE_ZERO or (real % ss != 0 and stop < end)
        add_extent(out, pos // ss, (stop - pos) // ss, is_data)
        pos = stop
    if not out:
        out.append(Extent(sector, 1, True))
    return out


def add_extent(out: list[Extent], sector: int, count: int, is_data: bool) -> None:
    if out and out[-1].is_data == is_data and out[-1].end == sector:
        out[-1] = Extent(out[-1].sector, out[-1].count + count, is_data)
    else:
        out.append(Extent(sector, count, is_data))


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
    is not retried, so a typo fails at once.
    """

    async def connect(n: trio.Nursery) -> NBDClient:
        return await connect_nbd(n, address, request_timeout=request_timeout)

    first = await connect(nursery)
    link = Reconnecting(nursery, connect, first, retries=retries, backoff=backoff)
    return RemoteDevice(link, address)
