"""Opening a mirror: checking the pair and the options, loading the map, starting the copier.

``prepare_mirror`` checks and loads, and touches neither device's data; the copier runs
only once its owner starts it in a nursery it can see (``start_mirror``), or for the
body of ``async with open_mirror(p, s) as m:``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from ...block import BlockDevice, Info, is_durable
from ...opening import OpenContext
from .copymap import CopyMap, Geometry
from .device import MirrorDevice
from .mapfile import STALE_MARK, MapStore
from .parts import Side, backing_path, data_plane, identity, signature, spread
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
RESUME_SAMPLE_BYTES = 16 << 10
"""A resumed copy compares samples of this size before the disk appears (whole 4 MiB
chunks kept a mount 21 s from appearing behind a 1 MB/s source)."""
RESUME_CANDIDATES = 32
"""How many places of the copied set a resumed copy reads the primary at, at most."""
RESUME_INFORMATIVE = 8
"""How many samples that hold data (on the primary) it compares with the secondary: a
sample of zeroes on both sides says nothing about a secondary that lost its data."""
VERIFY = ("sample", "full")
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
    state: str | MapStore | None = None,
    chunk: int = DEFAULT_CHUNK,
    rate: int | None = None,
    in_flight: int | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    verify: str = "sample",
    progress: Callable[[Progress], None] | None = None,
    ctx: OpenContext | None = None,
) -> MirrorDevice:
    """Check the pair and load the map at ``state``; the copier is not running yet.

    Raises ``MirrorRefused`` or ``CopyMapError`` (both ``ValueError``) before anything is
    written; the caller then still owns both devices.  Otherwise the mirror owns them
    (its ``aclose`` closes them) and the caller runs ``mirror.run_copier`` in a nursery
    (``start_mirror`` and ``open_mirror`` do).  A new map file is noted in ``ctx``.

    A saved map is checked before it is trusted (``check_resumed_copy``), and set aside
    for a secondary that keeps nothing across a close (``mem``: the spec refuses
    ``state=`` with one); with
    ``verify="full"`` the copier also compares every copied range before the mirror
    can be synced.
    """
    info = await check_pair(primary, secondary, chunk)
    if verify not in VERIFY:
        raise MirrorRefused(f"verify={verify} is not one of {', '.join(VERIFY)}")
    chunk_sectors = chunk // info.sector_size
    geometry = Geometry(info.size_sectors, info.sector_size, chunk_sectors)
    copy_map = CopyMap.open(geometry, state, identity(secondary) or "", ctx)
    if copy_map.copied_sectors and not is_durable(secondary):
        copy_map.forget("the secondary keeps nothing when it is closed (mem); copying anew")
    copy_map.watch_store(mark_stale=stale_marker(secondary))
    p_side = Side(primary, await primary.get_info(), info.sector_size)
    s_side = Side(secondary, await secondary.get_info(), info.sector_size, chunk_sectors)
    await check_resumed_copy(p_side, s_side, copy_map, min(chunk, RESUME_SAMPLE_BYTES))
    await copy_map.begin_session()
    clear_stale_mark(secondary)
    workers = in_flight or default_in_flight(chunk)
    return MirrorDevice(
        p_side, s_side, info, copy_map, chunk=chunk, rate=rate, in_flight=workers,
        retries=retries, backoff=backoff, progress=progress, notice=copy_map.forgotten,
        verify_first=verify == "full", plane=data_plane(primary),
    )  # fmt: skip


async def check_resumed_copy(
    primary: Side, secondary: Side, copy_map: CopyMap, sample_bytes: int
) -> None:
    """Decide whether a saved map can be trusted; if not, start over (``forget``).

    - A map closed cleanly recorded what identified both files then: a file written
      since (by anybody: a secondary emptied in place, a primary written while the
      mirror was not mounted) no longer matches, and nothing the map says holds.
    - A mark on the secondary's file names a map session that could not record its
      writes (copymap rule 6).
    - Then samples: places spread over the copied set are read on the primary, and
      those holding data compared with the secondary (a secondary that lost its data
      reads zeroes there).  This runs before the disk appears, so it reads little.
    """
    saved = copy_map.saved
    if saved is None or copy_map.forgotten or not copy_map.copied_sectors:
        return
    if saved.closed is not None:
        changed = changed_side(saved.closed, (signature(primary.dev), signature(secondary.dev)))
        if changed:
            return copy_map.forget(
                f"the {changed} was changed while the mirror was not mounted; copying anew"
            )
    if stale_mark(secondary.dev) == f"{copy_map.name} {saved.session}":
        return copy_map.forget(
            f"{copy_map.name} could not record writes last time (it was marked stale on "
            "the secondary); copying anew"
        )
    await compare_samples(primary, secondary, copy_map, sample_bytes)


def changed_side(then: tuple[str, str], now: tuple[str, str]) -> str:
    """Which side's signature differs (``""`` if neither; ``-`` matches nothing known)."""
    for side, a, b in zip(("primary", "secondary"), then, now, strict=True):
        if a != "-" and a != b:
            return side
    return ""


async def compare_samples(
    primary: Side, secondary: Side, copy_map: CopyMap, sample_bytes: int
) -> None:
    ss = copy_map.geometry.sector_size
    informative = 0
    for a, b in spread(copy_map.copied_runs(), RESUME_CANDIDATES, sample_bytes // ss):
        one = bytearray((b - a) * ss)
        await primary.read(a, [one])
        if one.count(0) == len(one):
            continue  # zeroes on both sides would prove nothing
        two = bytearray(len(one))
        await secondary.read(a, [two])
        if one != two:
            return copy_map.forget(f"sectors {a}-{b} differ from the saved map; copying anew")
        informative += 1
        if informative == RESUME_INFORMATIVE:
            return


def stale_marker(secondary: BlockDevice) -> Callable[[str], Awaitable[None]] | None:
    """How to mark the secondary's file with a map session not to trust (copymap rule 6)."""
    path = backing_path(secondary)
    if path is None:
        return None

    async def mark(value: str) -> None:
        await trio.to_thread.run_sync(_set_mark, path, value)

    return mark


def _set_mark(path: str, value: str) -> None:
    os.setxattr(path, STALE_MARK, value.encode())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stale_mark(dev: BlockDevice) -> str:
    path = backing_path(dev)
    if path is None:
        return ""
    try:
        return os.getxattr(path, STALE_MARK).decode(errors="replace")
    except OSError:
        return ""


def clear_stale_mark(dev: BlockDevice) -> None:
    """Remove a stale mark once a new session's map is saved (it no longer matches)."""
    path = backing_path(dev)
    if path is None:
        return
    with contextlib.suppress(OSError):  # none there (ENODATA), or no xattrs: nothing to do
        os.removexattr(path, STALE_MARK)


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
