#!/usr/bin/env python3
"""Scratch directory vs flat file: write then read back SIZE of 1 MiB appends.

One ``blockfuse mount`` shows a flat file on one device and a scratch directory on
another device of the same kind and size; the same bytes go through each, sequentially,
with plain ``os.write``/``os.readv`` of 1 MiB from page-aligned buffers (an unaligned
buffer makes the kernel split each direct-I/O request in two).  Prints MiB/s for each and the ratio
(scratch / flat; the target is at least 0.8x).  Every chunk read back is checked.

    scripts/bench_swap.py                 # 1 GiB on memory devices
    scripts/bench_swap.py --size 256 --kind file --runs 3
"""

from __future__ import annotations

import argparse
import mmap
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from benchlib import blockfuse_mount

MiB = 1 << 20


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=1024, help="MiB to write and read (default 1024)")
    p.add_argument("--kind", choices=["mem", "file"], default="mem", help="device kind")
    p.add_argument("--runs", type=int, default=3, help="runs per target; the best is kept")
    return p.parse_args()


def device_spec(kind: str, size_mib: int, workdir: Path, name: str) -> str:
    if kind == "mem":
        return f"mem({size_mib}M)"
    path = workdir / f"{name}.img"
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    return str(path)


@contextmanager
def mount(workdir: Path, flat: str, scratch: str) -> Iterator[Path]:
    mnt = workdir / "mnt"
    with blockfuse_mount(mnt, [f"flat={flat}"], ["--scratch", f"tmp={scratch}"]):
        yield mnt


def aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return buf


def write_all(path: Path, flags: int, chunks: int, base: bytes) -> float:
    buf = aligned(base)
    fd = os.open(path, flags)
    try:
        start = time.perf_counter()
        for i in range(chunks):
            buf[:8] = i.to_bytes(8, "little")
            assert os.write(fd, buf) == MiB
        return time.perf_counter() - start
    finally:
        os.close(fd)


def read_all(path: Path, chunks: int, base: bytes) -> float:
    buf = aligned(base)
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for i in range(chunks):
            assert os.readv(fd, [buf]) == MiB
            if buf[:8] != i.to_bytes(8, "little") or buf[8:] != base[8:]:
                raise SystemExit(f"{path}: chunk {i} read back wrong")
        return time.perf_counter() - start
    finally:
        os.close(fd)


Timing = tuple[float, float]


def best_of(runs: int, flat: Callable[[], Timing], swap: Callable[[], Timing]) -> list[Timing]:
    """Alternate the two targets (the machine is shared) and keep each one's best times."""
    results: list[list[Timing]] = [[], []]
    for _ in range(runs):
        results[0].append(flat())
        results[1].append(swap())
    return [(min(w for w, _ in r), min(t for _, t in r)) for r in results]


def main() -> None:
    args = parse_args()
    base = os.urandom(MiB)
    chunks = args.size
    with tempfile.TemporaryDirectory(prefix="bf-bench-swap-", dir="/var/tmp") as tmp:
        workdir = Path(tmp)
        flat = device_spec(args.kind, args.size, workdir, "flat")
        scratch = device_spec(args.kind, args.size, workdir, "scratch")
        with mount(workdir, flat, scratch) as mnt:

            def flat_once() -> tuple[float, float]:
                w = write_all(mnt / "flat", os.O_WRONLY, chunks, base)
                return w, read_all(mnt / "flat", chunks, base)

            def scratch_once() -> tuple[float, float]:
                path = mnt / "tmp" / "bench"
                w = write_all(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, chunks, base)
                r = read_all(path, chunks, base)
                path.unlink()
                return w, r

            flat, swap = best_of(args.runs, flat_once, scratch_once)
    report(args, flat, swap)


def report(args: argparse.Namespace, flat: tuple[float, float], swap: tuple[float, float]) -> None:
    print(f"{args.size} MiB of 1 MiB appends, {args.kind} devices, best of {args.runs}")
    print(f"| {'':6} | {'flat file MiB/s':>15} | {'scratch MiB/s':>13} | {'ratio':>6} |")
    print(f"|{'-' * 8}|{'-' * 17}|{'-' * 15}|{'-' * 8}|")
    for what, f, s in (("write", flat[0], swap[0]), ("read", flat[1], swap[1])):
        rate_f, rate_s = args.size / f, args.size / s
        print(f"| {what:6} | {rate_f:15.0f} | {rate_s:13.0f} | {rate_s / rate_f:5.2f}x |")


if __name__ == "__main__":
    main()
