#!/usr/bin/env python3
"""The mirror's copy rate against nbdcopy and qemu-img, its effect on foreground reads,
and the memory of its copy map.  One run, same source for everyone.

1. Copy rate.  nbdkit serves a 2 GiB sparse file (half data in runs of 64 KiB-8 MiB,
   half holes) over a Unix socket, from a private tmpfs (this VM pages idle page cache
   out during a run: a source there would be read from the disk by some copiers and not
   others).  Each copier writes it to a new sparse file on the scratch disk, told that
   the target is zero (``nbdcopy --destination-is-zero``, ``qemu-img convert -n
   --target-is-zero``; the mirror sees the holes of its ``sparse(...)`` secondary), then
   the target is fsync'd and removed, so every copy starts from the same cache state.
   Copiers run in a rotated order, one round after another; the table gives medians of
   MiB/s (of the 2 GiB device), of the per-round ratio to nbdcopy, and of CPU seconds
   per copy (the mirror's own process time, which includes its worker threads; the
   others' as child processes; nbdkit's is not counted for anyone).
2. Foreground reads.  fio 4 KiB random reads (O_DIRECT, libaio, depth 16) through
   ``blockfuse mount``: of the NBD export alone, of the mirror while its copier runs
   (unthrottled, for 1 s as the copy is short; and at ``rate=128M`` and ``rate=32M``: what
   a copy rate costs the foreground), and of the same mirror once synced (when reads come
   from the local secondary, whose pages the copy dropped from the cache).
3. Copy map memory.  RSS growth of an ``IntervalSet`` for a 1 TiB device in 1 MiB
   chunks: copied in order (the usual case) and every other chunk (the worst case).

About four minutes with the defaults on 2 cores; run it as root (tmpfs, FUSE).

    sudo .venv/bin/python scripts/bench_mirror.py [--size 2G] [--rounds 5] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import trio
from benchlib import blockfuse_mount, need, tmpfs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from blockfuse.devices.mirror import DEFAULT_CHUNK, default_in_flight, open_mirror  # noqa: E402
from blockfuse.devices.mirror.parts import data_plane  # noqa: E402
from blockfuse.extents import IntervalSet  # noqa: E402
from blockfuse.opening import OpenContext, background_tasks  # noqa: E402
from blockfuse.spec import compile_spec, parse_size  # noqa: E402
from blockfuse.threads import WorkerThreads  # noqa: E402

MiB = 1 << 20


def make_source(path: Path, size: int, seed: int = 1) -> int:
    """A sparse file: data runs and holes of 64 KiB-8 MiB, about half each; data bytes."""
    rng = random.Random(seed)
    data = 0
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            run = min(rng.randrange(1, 129) * 64 * 1024, size - pos)
            if rng.random() < 0.5:
                f.seek(pos)
                f.write(rng.randbytes(run))
                data += run
            pos += run
    return data


@contextmanager
def nbdkit(image: Path, sock: Path) -> Iterator[str]:
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(
        ["nbdkit", "-f", "-U", str(sock), "file", str(image)], stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("nbdkit did not start")
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(10)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(run: Callable[[], None], target: Path) -> tuple[float, float]:
    """Wall seconds and CPU seconds of one copy, from a fresh target to its fsync."""
    target.unlink(missing_ok=True)
    os.sync()  # the previous copy's writeback is not this one's
    cpu, start = cpu_seconds(), time.monotonic()
    run()
    fsync(target)
    return time.monotonic() - start, cpu_seconds() - cpu


def nbdcopy(uri: str, target: Path, size: int) -> None:
    with open(target, "wb") as f:
        f.truncate(size)
    subprocess.run(["nbdcopy", "--destination-is-zero", uri, str(target)], check=True)


def qemu_img(uri: str, target: Path, size: int) -> None:
    with open(target, "wb") as f:
        f.truncate(size)
    subprocess.run(
        ["qemu-img", "convert", "-n", "--target-is-zero", "-f", "raw", "-O", "raw",
         uri, str(target)],
        check=True,
    )  # fmt: skip


def mirror(uri: str, target: Path, chunk: str, in_flight: int) -> None:
    """``mirror(uri, sparse(target), chunk=chunk)`` with ``in_flight`` chunks in flight
    (which the spec does not set), opened as the spec opens it, until synced."""

    async def main() -> None:
        async with background_tasks() as nursery:
            ctx = OpenContext(nursery)
            primary = await compile_spec(uri).open(ctx)
            size = (await primary.get_info()).size_bytes
            secondary = await compile_spec(f"sparse({target}, size={size})").open(ctx)
            options = {"chunk": parse_size(chunk), "in_flight": in_flight}
            async with open_mirror(primary, secondary, **options) as dev:
                await dev.wait_synced()

    trio.run(main)


def floor(uri: str, target: Path, chunk: int = DEFAULT_CHUNK, in_flight: int = 0) -> None:
    """The same reads, writes and flushes as the copier, with no mirror: what our stack
    can do.  Like the copier, it reads through the data plane (``transport/blocking.py``)
    where the export allows it, writes behind, and starts a flush of the target every
    64 MiB written (one at a time).  ``in_flight`` 0: the copier's default."""
    in_flight = in_flight or default_in_flight(chunk)

    async def main() -> None:
        async with background_tasks() as nursery:
            ctx = OpenContext(nursery)
            source = await compile_spec(uri).open(ctx)
            plane = data_plane(source)
            threads = WorkerThreads(in_flight, "floor")
            info = await source.get_info()
            sink = await compile_spec(f"sparse({target}, size={info.size_bytes})").open(ctx)
            data: list[tuple[int, int]] = []
            pos = 0
            while pos < info.size_sectors:
                for ext in await source.extents(pos, info.size_sectors - pos):
                    if ext.is_data:
                        data += [(s, min(s + chunk // 512, ext.end))
                                 for s in range(ext.sector, ext.end, chunk // 512)]  # fmt: skip
                    pos = ext.end

            data.reverse()  # popped from the end: copied in order, as the copier does
            unflushed, flushing = [0], [False]

            async def flush_behind() -> None:
                flushing[0] = True
                await sink.flush()
                flushing[0] = False

            async def worker(nursery: trio.Nursery) -> None:
                buf = bytearray(chunk)
                while data:
                    a, b = data.pop()
                    view = memoryview(buf)[: (b - a) * 512]
                    if plane is not None:
                        read = plane.read_into
                        await threads.run(read, view, a * 512)
                    else:
                        await source.read(a, [view])
                    await sink.write(a, [view])
                    await sink.write_behind(a, b - a)
                    unflushed[0] += len(view)
                    if unflushed[0] >= 64 * MiB and not flushing[0]:
                        unflushed[0] = 0
                        nursery.start_soon(flush_behind)

            async with trio.open_nursery() as nursery:
                for _ in range(in_flight):
                    nursery.start_soon(worker, nursery)
            await sink.flush()
            if plane is not None:
                plane.close()
            await source.aclose()
            await sink.aclose()

    trio.run(main)


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def copy_rates(args: argparse.Namespace, work: Path, source: Path, size: int) -> None:
    """Each copier once per round, in an order rotated by one each round."""
    target = work / "target.img"
    with nbdkit(source, work / "nbd.sock") as uri:
        copiers: list[tuple[str, Callable[[], None]]] = [
            ("nbdcopy", lambda: nbdcopy(uri, target, size)),
            ("qemu-img convert -n", lambda: qemu_img(uri, target, size)),
        ]
        for setting in args.mirror:
            chunk, in_flight = setting.split("x")
            name = f"blockfuse mirror, chunk {chunk}, {in_flight} in flight"
            if parse_size(chunk) == DEFAULT_CHUNK and int(in_flight) == default_in_flight(
                DEFAULT_CHUNK
            ):
                name += " (default)"
            copiers.append((name, lambda c=chunk, n=int(in_flight): mirror(uri, target, c, n)))
        copiers.append(("floor (no mirror): NBD read + sparse write, 4M x 4",
                        lambda: floor(uri, target)))  # fmt: skip
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in copiers}
        for round_ in range(args.rounds):
            turn = round_ % len(copiers)
            for name, run in copiers[turn:] + copiers[:turn]:
                runs[name].append(timed(run, target))
                if round_ == 0:  # once is enough; each cmp reads 4 GiB, churning memory
                    assert same(source, target), f"{name} made a different copy"
            target.unlink(missing_ok=True)
    report_rates(runs, size, args.rounds)


def report_rates(runs: dict[str, list[tuple[float, float]]], size: int, rounds: int) -> None:
    reference = [wall for wall, _ in runs["nbdcopy"]]
    print(f"\nCopy of a {size >> 20} MiB device (half data) from nbdkit over a Unix socket,"
          f" {rounds} rounds, rotated; medians")  # fmt: skip
    print(f"{'copier':54} {'MiB/s':>7} {'vs nbdcopy':>10} {'CPU s':>6}")
    for name, got in runs.items():
        rates = [size / MiB / wall for wall, _ in got]
        ratios = [ref / wall for ref, (wall, _) in zip(reference, got, strict=True)]
        cpu = statistics.median(c for _, c in got)
        print(f"{name:54} {statistics.median(rates):7.0f} {statistics.median(ratios):9.2f}x"
              f" {cpu:6.2f}")  # fmt: skip
    print("every copy, MiB/s:")
    for name, got in runs.items():
        print(f"  {name:52} {' '.join(f'{size / MiB / wall:.0f}' for wall, _ in got)}")


def fio_iops(path: Path, runtime: int) -> float:
    out = subprocess.run(
        ["fio", "--name=r", f"--filename={path}", "--rw=randread", "--bs=4k", "--direct=1",
         "--ioengine=libaio", "--iodepth=16", f"--runtime={runtime}", "--time_based",
         "--output-format=json"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return float(json.loads(out)["jobs"][0]["read"]["iops"])


def xattr(path: Path, key: str) -> str:
    return os.getxattr(path, f"user.blockfuse.{key}").decode()


def foreground(args: argparse.Namespace, work: Path, source: Path) -> None:
    print(f"\nfio 4 KiB random reads, depth 16, {args.runtime} s each, through the mount")
    plain = plain_nbd_iops(args, work, source)
    print(f"  the NBD export mounted alone (no mirror):         {plain:8.0f} IOPS")
    settings = (
        ("unthrottled", "", 1),
        ("rate=128M", ", rate=128M", 3),
        ("rate=32M", ", rate=32M", 3),
    )
    for label, extra, runtime in settings:
        during, after, note = fio_during_and_after(args, work, source, extra, runtime)
        print(f"  mirror, copier {label:11} during the copy ({runtime} s): {during:8.0f} IOPS"
              f"  {during / plain:4.2f}x  ({note})")  # fmt: skip
        print(f"  the same mirror once synced (reads local):       {after:8.0f} IOPS")


@contextmanager
def mount(work: Path, spec: str) -> Iterator[Path]:
    with blockfuse_mount(work / "mnt", [spec]):
        yield work / "mnt" / "disk"


def plain_nbd_iops(args: argparse.Namespace, work: Path, source: Path) -> float:
    with nbdkit(source, work / "nbd.sock") as uri, mount(work, f"disk={uri}") as disk:
        return fio_iops(disk, args.runtime)


def fio_during_and_after(
    args: argparse.Namespace, work: Path, source: Path, extra: str, runtime: int
) -> tuple[float, float, str]:
    target = work / "target.img"
    target.unlink(missing_ok=True)
    with nbdkit(source, work / "nbd.sock") as uri:
        spec = f"disk=mirror({uri}, sparse({target}), chunk={args.chunk}{extra})"
        with mount(work, spec) as disk:
            during = fio_iops(disk, runtime)
            progress = xattr(disk, "progress")
            still = xattr(disk, "state") == "copying"
            while xattr(disk, "state") != "synced":
                time.sleep(0.1)
            after = fio_iops(disk, args.runtime)
    note = f"at {progress}% when fio ended"
    if not still:
        note = "the copy ended before fio did: understated"
    return during, after, note


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def map_memory() -> None:
    chunk = MiB // 512
    chunks = (1 << 40) // MiB
    print("\nCopy map (IntervalSet of 512-byte sectors) for a 1 TiB device in 1 MiB chunks"
          " (a quarter of the intervals with the default 4 MiB)")  # fmt: skip
    for name, step in (("copied in order", 1), ("every other chunk (worst case)", 2)):
        before = rss()
        s = IntervalSet()
        for i in range(0, chunks, step):
            s.add(i * chunk, (i + 1) * chunk)
        grown = rss() - before
        print(f"  {name:34} {len(s):8} intervals  {grown / MiB:6.1f} MiB")
        del s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G", help="device size (default 2G)")
    parser.add_argument("--runtime", type=int, default=3, help="seconds per fio run")
    parser.add_argument("--rounds", type=int, default=5, help="copies per copier")
    parser.add_argument("--chunk", default="4M", help="the mount's mirror chunk size")
    parser.add_argument(
        "--mirror",
        nargs="+",
        default=["4Mx4"],
        metavar="CHUNKxN",
        help="mirror settings to time: chunk size x chunks in flight (adding 1Mx16, the "
        "old default, slowed the copies after it: the default's median fell to 0.5-0.6x)",
    )
    parser.add_argument("--dir", default=None, help="scratch directory (default: /var/tmp)")
    args = parser.parse_args()
    for tool, package in [("nbdkit", "nbdkit"), ("nbdcopy", "libnbd-bin"),
                          ("qemu-img", "qemu-utils"), ("fio", "fio")]:  # fmt: skip
        need(tool, package)
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="bf-bench-mirror-", dir=args.dir or "/var/tmp"))
    try:
        with tmpfs(work / "pinned", size + 64 * MiB) as pinned:
            source = pinned / "source.img"
            data = make_source(source, size)
            print(f"source: {size >> 20} MiB, {data >> 20} MiB of data ({100 * data // size}%)"
                  ", on a tmpfs")  # fmt: skip
            copy_rates(args, work, source, size)
            foreground(args, work, source)
        map_memory()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
