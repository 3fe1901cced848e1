"""Crash consistency and faults for the mirror: disks and map stores that know what a
power cut would leave, and a driver that checks every promise at many cuts.

After dm-log-writes (record every write and flush, replay any prefix), CrashMonkey
(crash at every flush boundary, check what fsync promised) and ALICE (a crash may persist
any subset of what was not flushed).  Everything runs on trio's autojump clock in one
process, so a seed is a complete, repeatable experiment.

``SimDisk`` and ``SimStore`` (``simulated.py``) are storage that knows what a power cut
would leave: what was flushed, plus any subset of what was not.

``run_seed``
    A mirror of two ``SimDisk`` with a ``SimStore`` map, racing foreground writers and
    fsyncs against the copier (and sometimes a pivot; and sometimes the controls a user
    has: cancel, retry, a new rate limit), with faults if asked.  At random
    events (writes, flushes, saves) it cuts power: it keeps the crash images of all
    three at that instant, with what the user had been promised by then.  Afterwards,
    for every cut, it checks:

    1. the map never vouches for a sector where the two crash images differ;
    2. every sector the user's successful fsyncs promised is on the primary's image (or
       a value written after it);
    3. a mirror reopened from the images (no faults now) copies to the end, and then
       reads only promised-or-later values, with both sides equal;
    4. a pivoted map's secondary holds what was promised.

Promises follow Linux: a successful fsync promises the writes acknowledged before it
began, except those acknowledged before the end of an fsync that failed (its flush may
have lost any of them: an application must assume so), and a failure that a checkpoint
met must reach every writer's next fsync (the errseq rule: each writer here has a
cursor of its own).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import trio
import trio.testing

from ..block import FlushCursor
from ..devices.mirror import CopyMapError, MirrorDevice, MirrorFailed, prepare_mirror
from ..devices.mirror.mapfile import parse_map
from ..errors import BlockError
from ..rangelock import RangeLock
from .simulated import SS, Faults, SimDisk, SimStore

# --- what the user was promised ---------------------------------------------------------------


@dataclass
class Write:
    index: int
    sector: int
    data: bytes
    state: str = "in flight"
    """``in flight``, ``acked`` or ``failed``."""


class Promises:
    """The user's writes and fsyncs, and which values each sector may hold after a crash."""

    def __init__(self, initial: bytes) -> None:
        self.initial = initial
        self.writes: list[Write] = []
        self.promised: dict[int, int] = {}
        """sector -> the index of the newest write a successful fsync promised there."""
        self._doubtful_before = 0
        """Writes acknowledged before this many writes were issued may be lost for good
        (an fsync failed after them)."""

    def issue(self, sector: int, data: bytes) -> Write:
        w = Write(len(self.writes), sector, data)
        self.writes.append(w)
        return w

    def fsync_began(self) -> list[Write]:
        return [w for w in self.writes if w.state == "acked" and w.index >= self._doubtful_before]

    def fsync_ended(self, covered: list[Write], ok: bool) -> None:
        """A failed fsync may have lost any write acknowledged before it ended (its
        flush covered those it met): no later fsync promises them."""
        if not ok:
            self._doubtful_before = len(self.writes)
            return
        for w in covered:
            for s in range(w.sector, w.sector + len(w.data) // SS):
                self.promised[s] = max(self.promised.get(s, -1), w.index)

    def snapshot(self) -> Callable[[int], set[bytes]]:
        """Which values each sector may hold, as promised right now."""
        promised = dict(self.promised)
        writes = list(self.writes)

        def acceptable(sector: int) -> set[bytes]:
            newest = promised.get(sector, -1)
            out = set()
            if newest < 0:
                out.add(self.initial[sector * SS : (sector + 1) * SS])
            for w in writes:
                end = w.sector + len(w.data) // SS
                if w.sector <= sector < end and w.index >= newest:
                    out.add(w.data[(sector - w.sector) * SS : (sector - w.sector + 1) * SS])
            return out

        return acceptable


# --- the experiment ---------------------------------------------------------------------------


@dataclass
class Cut:
    what: str
    primary: bytes
    secondary: bytes
    store: str | None
    acceptable: Callable[[int], set[bytes]]


@dataclass(frozen=True)
class Plan:
    """What one seed does, drawn from its random numbers."""

    sectors: int
    chunk_sectors: int
    in_flight: int
    rate: int | None
    writers: int
    ops: int
    pivot: bool
    verify: str
    faults: dict[str, float]
    steer: int = 0
    """How many controls (cancel, retry, rate) a user sends while it runs."""

    @classmethod
    def draw(cls, rng: random.Random, faults: bool) -> Plan:
        chunk = rng.choice([4, 8, 16])
        return cls(
            sectors=chunk * rng.randrange(4, 17),
            chunk_sectors=chunk,
            in_flight=rng.randrange(1, 5),
            rate=rng.choice([None, 16 << 10, 64 << 10]),
            writers=rng.randrange(1, 4),
            ops=rng.randrange(4, 25),
            pivot=rng.random() < 0.25,
            verify=rng.choice(["sample", "full"]),
            faults=(
                {
                    "write": rng.choice([0, 0.02, 0.1]),
                    "flush": rng.choice([0, 0.05, 0.2]),
                    "read": rng.choice([0, 0.01]),
                    "save": rng.choice([0, 0.05, 0.3]),
                    "invalidate": rng.choice([0, 0.5]),
                }
                if faults
                else {}
            ),
            steer=rng.choice([0, 0, 1, 3]),
        )


MAX_CUTS = 12


def run_seed(seed: int, *, faults: bool = False) -> list[str]:
    """One experiment; the problems found (empty: every check held)."""
    trio._core._run._r.seed(seed)  # trio shuffles runnable tasks: make that repeatable too
    return trio.run(_run_seed, seed, faults, clock=trio.testing.MockClock(autojump_threshold=0))


async def _run_seed(seed: int, faults: bool) -> list[str]:
    rng = random.Random(seed)
    plan = Plan.draw(rng, faults)
    size = plan.sectors * SS
    initial = rng.randbytes(size)
    promises = Promises(initial)
    fault = Faults(random.Random(seed + 1), plan.faults, on=faults)
    cuts: list[Cut] = []
    cut_rng = random.Random(seed + 2)
    world: dict[str, object] = {}

    def event(what: str) -> None:
        if len(cuts) < MAX_CUTS and cut_rng.random() < 0.15:
            cuts.append(cut(what))

    def cut(what: str) -> Cut:
        p, s, st = world["primary"], world["secondary"], world["store"]
        assert isinstance(p, SimDisk) and isinstance(s, SimDisk) and isinstance(st, SimStore)
        return Cut(
            what, p.crash_image(cut_rng), s.crash_image(cut_rng), st.crash_image(cut_rng),
            promises.snapshot(),
        )  # fmt: skip

    primary = SimDisk(
        initial, rng=random.Random(seed + 3), faults=fault, event=event, name="primary"
    )
    secondary = SimDisk(
        rng.randbytes(size), rng=random.Random(seed + 4), faults=fault, event=event,
        name="secondary",
    )  # fmt: skip
    store = SimStore(rng=random.Random(seed + 5), faults=fault, event=event)
    world.update(primary=primary, secondary=secondary, store=store)
    problems: list[str] = []
    try:
        mirror = await prepare_mirror(
            primary, secondary, state=store, chunk=plan.chunk_sectors * SS, rate=plan.rate,
            in_flight=plan.in_flight, backoff=0.01, verify=plan.verify,
        )  # fmt: skip
    except (CopyMapError, BlockError):
        return []  # the first save failed: nothing was written, nothing to check
    with trio.fail_after(10_000):
        async with trio.open_nursery() as nursery:
            await nursery.start(mirror.run_copier)
            async with trio.open_nursery() as users:
                lock = RangeLock()
                for w in range(plan.writers):
                    wrng = random.Random(seed * 7 + w)
                    users.start_soon(_writer, mirror, promises, plan, wrng, lock)
                if plan.pivot:
                    users.start_soon(_pivot_when_synced, mirror)
                if plan.steer:
                    users.start_soon(_steer, mirror, plan.steer, random.Random(seed + 6))
            await mirror.aclose()
    fault.on = False
    cuts.append(cut("after close"))
    for n, c in enumerate(cuts):
        for problem in await _check(c, plan):
            problems.append(
                f"seed {seed}{' (faults)' if faults else ''}, cut {n} at {c.what}: {problem}"
            )
    return problems


async def _writer(
    mirror: MirrorDevice, promises: Promises, plan: Plan, rng: random.Random, lock: RangeLock
) -> None:
    """One user: writes and fsyncs.  Overlapping writes take turns in the order they
    were issued, as every front end makes them (two overlapping writes in flight at once
    may land in either order on any disk)."""
    user = FlushCursor(mirror)
    for _ in range(plan.ops):
        # Jittered: two sleeps ending at the same instant would be ordered by trio by
        # object ids, which change from run to run and would make a seed unrepeatable.
        await trio.sleep(rng.choice([0, 0, 0.001, 0.01, 0.5, 2.5]) * (1 + rng.random() / 64))
        if rng.random() < 0.25:
            covered = promises.fsync_began()
            try:
                await user.flush()
            except BlockError:
                promises.fsync_ended(covered, False)
            else:
                promises.fsync_ended(covered, True)
            continue
        count = rng.randrange(1, 9)
        sector = rng.randrange(0, plan.sectors - count + 1)
        w = promises.issue(sector, rng.randbytes(count * SS))
        hold = await lock.acquire(sector, sector + count)
        try:
            await mirror.write(sector, [w.data])
        except BlockError:
            w.state = "failed"
        else:
            w.state = "acked"
        finally:
            lock.release(hold)


async def _pivot_when_synced(mirror: MirrorDevice) -> None:
    try:
        await mirror.wait_synced()
        await mirror.pivot()
    except (BlockError, MirrorFailed):
        pass


async def _steer(mirror: MirrorDevice, controls: int, rng: random.Random) -> None:
    """A user cancelling the copy, retrying it, changing its rate, at random times."""
    for _ in range(controls):
        await trio.sleep(rng.choice([0, 0.01, 0.1, 1, 5]) * (1 + rng.random() / 64))
        action = rng.choice(["cancel", "retry", "rate"])
        try:
            if action == "cancel":
                await mirror.cancel()
            elif action == "retry":
                mirror.retry()
            else:
                mirror.set_rate(rng.choice([None, 16 << 10, 64 << 10]))
        except BlockError:
            pass  # refused where it does not apply, as a user's would be


async def _check(c: Cut, plan: Plan) -> list[str]:
    problems: list[str] = []
    saved = parse_map(c.store, "map") if c.store is not None else None
    if saved is not None and saved.pivoted:
        return _unpromised(c.secondary, c, "the pivoted secondary")
    if saved is not None and not saved.invalidated:
        for a, b in saved.vouched():
            for s in range(a, b):
                if c.primary[s * SS : (s + 1) * SS] != c.secondary[s * SS : (s + 1) * SS]:
                    problems.append(f"the map vouches for sector {s}, which differs")
                    break
    problems += _unpromised(c.primary, c, "the primary")
    problems += await _recover(c, plan)
    return problems


def _unpromised(image: bytes, c: Cut, where: str) -> list[str]:
    for s in range(len(image) // SS):
        if image[s * SS : (s + 1) * SS] not in c.acceptable(s):
            return [f"{where} lost sector {s}, which an fsync promised"]
    return []


async def _recover(c: Cut, plan: Plan) -> list[str]:
    """Reopen a mirror from the crash images, copy to the end, and read it all."""
    rng = random.Random(len(c.primary))
    primary, secondary = SimDisk(c.primary, rng=rng), SimDisk(c.secondary, rng=rng)
    store = SimStore(c.store)
    try:
        mirror = await prepare_mirror(
            primary, secondary, state=store, chunk=plan.chunk_sectors * SS,
            in_flight=plan.in_flight, verify=plan.verify,
        )  # fmt: skip
    except CopyMapError as exc:
        return [f"the reopened mirror was refused: {exc}"]
    async with trio.open_nursery() as nursery:
        await nursery.start(mirror.run_copier)
        try:
            await mirror.wait_synced()
        except MirrorFailed as exc:
            return [f"the reopened mirror failed: {exc}"]
        data = bytearray(len(c.primary))
        await mirror.read(0, [data])
        await mirror.aclose()
    problems = _unpromised(bytes(data), c, "the reopened mirror")
    if primary.current != secondary.current:
        problems.append("the reopened mirror synced with the two sides different")
    return problems
