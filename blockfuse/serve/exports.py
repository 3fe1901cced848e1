"""The devices a server exports: what each advertises, and the backend the transport asks.

An ``Export`` is a device seen as bytes (``DeviceBytes``) with a name: the very object a
mount's flat file is, when ``mount --serve`` shares its devices, so NBD and FUSE writes
to one sector take turns in one range lock and each sees the other's at once.

What an export advertises is exactly what its device honours::

    always          HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_DF, SEND_CACHE, CAN_MULTI_CONN
    read-only       READ_ONLY (and nothing that writes)
    writable        SEND_WRITE_ZEROES, SEND_FAST_ZERO; SEND_TRIM if the device can discard
    block sizes     minimum 1 (any offset and length: the byte bridge), preferred 4096 (or
                    the sector size), maximum payload 32 MiB

CAN_MULTI_CONN holds because every connection shares the one device object of the
process: a FLUSH on any connection flushes the device, covering every write answered
before it on every connection.  WRITE_ZEROES is honoured on every writable device (by
writing zeroes where it cannot zero cheaply); FAST_ZERO is then refused with ENOTSUP,
as the spec asks.  The description is the device's spec.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..block import Capability
from ..nbd.constants import DEFAULT_MAX_PAYLOAD, TxFlag
from ..nbd.events import ExportInfo, ServerReady
from ..sectors import DeviceBytes
from ..transport.connection import ExportTable
from ..transport.pool import BufferPool
from .requests import RequestHandler

PREFERRED_BLOCK = 4096
ALWAYS = (
    TxFlag.HAS_FLAGS
    | TxFlag.SEND_FLUSH
    | TxFlag.SEND_FUA
    | TxFlag.SEND_DF
    | TxFlag.SEND_CACHE
    | TxFlag.CAN_MULTI_CONN
)


@dataclass(frozen=True)
class Export:
    """A named device as the server shows it; ``spec`` is its description."""

    name: str
    bytes: DeviceBytes
    kind: str
    spec: str


async def export_info(export: Export) -> ExportInfo:
    """What ``export`` advertises now (its size may have changed since the last time)."""
    info = await export.bytes.info()
    flags = ALWAYS
    if not info.read_write:
        flags |= TxFlag.READ_ONLY
    else:
        flags |= TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FAST_ZERO
        if Capability.DISCARD in export.bytes.device.capabilities:
            flags |= TxFlag.SEND_TRIM
    return ExportInfo(
        export.name,
        info.size_bytes,
        flags,
        export.spec,
        min_block=1,
        preferred_block=max(PREFERRED_BLOCK, info.sector_size),
        max_payload=DEFAULT_MAX_PAYLOAD,
        block_size_given=True,
    )


async def facts(export: Export) -> dict[str, str]:
    """The status of one export's device: the keys a mount's flat file shows as
    ``user.blockfuse.*`` attributes, with the same values."""
    info = await export.bytes.info()
    values = {
        "kind": export.kind,
        "spec": export.spec,
        "size": str(info.size_bytes),
        "sector_size": str(info.sector_size),
        "read_only": "no" if info.read_write else "yes",
    }
    values.update(export.bytes.status())
    return values


class ServeBackend:
    """The transport's view of a set of exports: the first is also the default ``""``."""

    def __init__(self, exports: Sequence[Export]) -> None:
        self.exports = tuple(exports)
        self._by_name = {e.name: e for e in exports}
        self._buffers = BufferPool()
        """READ reply buffers, shared by the connections (``transport/pool.py``)."""

    async def table(self) -> ExportTable:
        infos = tuple([await export_info(e) for e in self.exports])
        return ExportTable(infos, self.exports[0].name if self.exports else None)

    def open(self, ready: ServerReady, peer: str, *, sends_files: bool = False) -> RequestHandler:
        export = self._by_name[ready.export.name]
        return RequestHandler(
            export.bytes, ready.structured, self._buffers, sends_files=sends_files
        )
