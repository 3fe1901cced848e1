"""Opening a mirror: checking the pair and the options, loading the map, starting the copier.

``prepare_mirror`` checks and loads, and touches neither device's data; the copier runs
only once its owner starts it in a nursery it can see (``start_mirror``), or for the
body of ``async with open_mirror(p, s) as m:``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from ...block import BlockDevice, Info
from ...opening import OpenContext
from .copymap import CopyMap, Geometry
from .device import MirrorDevice
from .parts import Side, spread
from .state import Progress

DEFAULT_CHUNK = 4 << 20
"""Copying 2 GiB from nbdkit (bench_mirror.py, 2 cores), 4 MiB chunks with 4 in flight
had the higher median in 7 of 8 runs against 1 MiB chunks with 16 in flight (the old
default): 0.58x-0.91x nbdcopy against 0.31x-0.71x; 2 MiB x 8 and 8 MiB x 2 or 4 fell
between.  A foreground write that overlaps an item being copied waits for it: a chunk
of data, or a run of holes (quick, unless writes put data there since the planner
looked)."""
MAX_CHUNK = 64 << 20
"""The largest chunk: each chunk in flight is a buffer in memory."""
IN_FLIGHT_BYTES = 16 << 20
"""The copier keeps this many bytes of chunks in flight, in 2 to 16 chunks.  (More
small chunks queue more ahead of foreground requests on a slow link: 64 chunks of
256 KiB behind nbdkit's rate filter at 160 MB/s let the copy end before mkfs did.)"""
RESUME_SAMPLE_BYTES = 64 << 10
"""A resumed copy compares this much of each side, four times, before the disk appears
(whole 4 MiB chunks kept a mount 21 s from appearing behind a 1 MB/s source)."""
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF = 0.2


class MirrorRefused(ValueError):
    """The two devices cannot form a mirror; nothing was written.  One line, says why."""


def check_options(chunk: int, rate: int | None) -> None:
    """Raise ``MirrorRefused`` for a chunk or rate no mirror can use (before opening)."""
    if chunk <= 0:
        raise MirrorRefused("a mirror chunk must be more than 0 bytes (or left out: 4M)")
    if chunk % 512:
        raise MirrorRefused(f"mirror chunk {chunk} is not a whole number of 512-byte sectors")
    if chunk > MAX_CHUNK:
        raise MirrorRefused(
            f"mirror chunk {chunk} bytes is more than {MAX_CHUNK >> 20} MiB: each chunk in "
            "flight is held in memory (leave it out for 4M)"
        )
    if rate is not None and rate <= 0:
        raise MirrorRefused("mirror rate must be more than 0 bytes per second (or left out)")


def identity(dev: BlockDevice) -> str | None:
    """``DEV:INO`` of the file under ``dev``, if it stands on one."""
    layer: BlockDevice | None = dev
    while layer is not None:
        path = getattr(layer, "path", None)
        if isinstance(path, str):
            try:
                st = os.stat(path)
            except OSError:
                return None
            return f"{st.st_dev}:{st.st_ino}"
        layer = layer.inner
    return None


async def check_pair(primary: BlockDevice, secondary: BlockDevice, chunk: int) -> Info:
    """The mirror's geometry, or ``MirrorRefused`` saying why these two cannot mirror."""
    check_options(chunk, None)
    p, s = await primary.get_info(), await secondary.get_info()
    if primary is secondary or (identity(primary) or 0) == (identity(secondary) or 1):
        raise MirrorRefused("the secondary is the primary itself; mirror onto another device")
    if not s.read_write:
        raise MirrorRefused("the secondary is read-only; the mirror must write to it")
    big, small = max(p.sector_size, s.sector_size), min(p.sector_size, s.sector_size)
    if big % small:
        raise MirrorRefused(
            f"sector sizes {p.sector_size} (primary) and {s.sector_size} (secondary) "
            "are not multiples of each other"
        )
    if p.size_bytes != s.size_bytes:
        raise MirrorRefused(
            f"the primary is {p.size_bytes} bytes and the secondary {s.size_bytes}; "
            "they must be the same size"
        )
    if chunk % big:
        raise MirrorRefused(f"chunk {chunk} is not a whole number of {big}-byte sectors")
    return Info(p.read_write, big, p.size_bytes // big)


async def prepare_mirror(
    primary: BlockDevice,
    secondary: BlockDevice,
    *,
    state: str | None = None,
    chunk: int = DEFAULT_CHUNK,
    rate: int | None = None,
    in_flight: int | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    progress: Callable[[Progress], None] | None = None,
    ctx: OpenContext | None = None,
) -> MirrorDevice:
    """Check the pair and load the map at ``state``; the copier is not running yet.

    Raises ``MirrorRefused`` or ``CopyMapError`` (both ``ValueError``) before anything is
    written; the caller then still owns both devices.  Otherwise the mirror owns them
    (its ``aclose`` closes them) and the caller runs ``mirror.run_copier`` in a nursery
    (``start_mirror`` and ``open_mirror`` do).  A new map file is noted in ``ctx``.
    """
    info = await check_pair(primary, secondary, chunk)
    chunk_sectors = chunk // info.sector_size
    geometry = Geometry(info.size_sectors, info.sector_size, chunk_sectors)
    copy_map = CopyMap.open(geometry, state, identity(secondary) or "", ctx)
    p_side = Side(primary, await primary.get_info(), info.sector_size)
    s_side = Side(secondary, await secondary.get_info(), info.sector_size, chunk_sectors)
    await check_resumed_copy(p_side, s_side, copy_map, min(chunk, RESUME_SAMPLE_BYTES))
    return MirrorDevice(
        p_side, s_side, info, copy_map, chunk=chunk, rate=rate,
        in_flight=in_flight or default_in_flight(chunk), retries=retries, backoff=backoff,
        progress=progress, notice=copy_map.forgotten,
    )  # fmt: skip


async def check_resumed_copy(
    primary: Side, secondary: Side, copy_map: CopyMap, sample_bytes: int, samples: int = 4
) -> None:
    """Compare a few samples of what a saved map says is copied; on a difference,
    start over.  Samples are small: this runs before the disk appears.

    Catches a map kept while its secondary was replaced by another file that the
    file identity cannot tell apart (a new file may reuse the old inode number).
    """
    ss = copy_map.geometry.sector_size
    for a, b in spread(copy_map.copied_runs(), samples, sample_bytes // ss):
        n = b - a
        one, two = bytearray(n * ss), bytearray(n * ss)
        await primary.read(a, [one])
        await secondary.read(a, [two])
        if one != two:
            copy_map.forget(f"sectors {a}-{a + n} differ from the saved map; copying anew")
            break
    if copy_map.forgotten:
        await copy_map.save_now()  # a crash from now on must not trust the old map


def default_in_flight(chunk: int) -> int:
    """How many chunks of ``chunk`` bytes the copier copies at once."""
    return max(2, min(16, IN_FLIGHT_BYTES // chunk))


async def start_mirror(
    nursery: trio.Nursery, primary: BlockDevice, secondary: BlockDevice, **options: Any
) -> MirrorDevice:
    """``prepare_mirror``, then start its copier in ``nursery``; options as there."""
    mirror = await prepare_mirror(primary, secondary, **options)
    await nursery.start(mirror.run_copier)
    return mirror


@asynccontextmanager
async def open_mirror(
    primary: BlockDevice, secondary: BlockDevice, **options: Any
) -> AsyncIterator[MirrorDevice]:
    """``async with open_mirror(p, s) as m: ... await m.wait_synced()``; closes ``m`` at the end.

    The copier runs in a nursery of its own for the body of the block.  An ordinary
    exception from the body leaves the block as itself, not wrapped in an exception
    group, so a caller that enters this through an ``AsyncExitStack`` can still catch
    its own errors; a bug in the copier ends the block with an exception group.
    """
    mirror = await prepare_mirror(primary, secondary, **options)
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(mirror.run_copier)
        try:
            yield mirror
        except Exception as exc:
            failure = exc
        finally:
            await mirror.aclose()
    if failure is not None:
        raise failure
