#!/usr/bin/env python3
"""Read throughput of our NBD client vs libnbd's Python binding vs nbdcopy, in one run.

Serves ``nbdkit memory SIZE`` on a Unix socket (unwritten memory reads as zeroes; nbdkit
still sends every byte as data) and measures, each client in turn on the same server:

- sequential reads of SIZE with 1 MiB and with 128 KiB requests;
- 4 KiB reads at random aligned offsets for a fixed time.

Our client runs one request at a time (QD1, like libnbd's synchronous ``pread``) and with
16 requests in flight (QD16).  nbdcopy (``--no-extents URI null:``) is the C reference for
the sequential rows only.  The machine is shared, so every client runs ``--rounds`` times,
interleaved, and the best of each is kept.  Prints MB/s (or IOPS) and the ratio to
libnbd-python; also the peak RSS, to show that memory stays bounded with many requests
in flight.

    .venv/bin/python scripts/bench_nbd.py [--size 1G] [--seconds 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import trio

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from blockfuse.nbd.uri import parse_uri
from blockfuse.transport.client import NBDClient
from blockfuse.transport.connect import open_nbd_client

MiB = 1 << 20


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="1G", help="bytes to read sequentially (default 1G)")
    p.add_argument("--seconds", type=float, default=2.0, help="time per random-read run")
    p.add_argument("--rounds", type=int, default=3, help="runs per client; the best counts")
    return p.parse_args()


def size_of(text: str) -> int:
    units = {"K": 10, "M": 20, "G": 30}
    return int(text[:-1]) << units[text[-1].upper()] if text[-1].isalpha() else int(text)


# --- ours ---------------------------------------------------------------------------------


async def ours_sequential(client: NBDClient, size: int, request: int, depth: int) -> float:
    offsets = iter(range(0, size, request))

    async def worker() -> None:
        buf = memoryview(bytearray(request))
        for off in offsets:
            await client.pread(buf, off)

    t = time.perf_counter()
    async with trio.open_nursery() as n:
        for _ in range(depth):
            n.start_soon(worker)
    return time.perf_counter() - t


async def ours_random(client: NBDClient, size: int, seconds: float, depth: int) -> int:
    count = 0
    deadline = time.perf_counter() + seconds

    async def worker(seed: int) -> None:
        nonlocal count
        rng = random.Random(seed)
        buf = memoryview(bytearray(4096))
        while time.perf_counter() < deadline:
            await client.pread(buf, rng.randrange(size // 4096) * 4096)
            count += 1

    async with trio.open_nursery() as n:
        for i in range(depth):
            n.start_soon(worker, i)
    return count


async def run_ours(uri: str, size: int, seconds: float) -> dict[str, float]:
    out: dict[str, float] = {}
    async with open_nbd_client(parse_uri(uri)) as client:
        for depth in (1, 16):
            for request in (MiB, 128 << 10):
                elapsed = await ours_sequential(client, size, request, depth)
                out[f"seq {request >> 10}K QD{depth}"] = size / elapsed / 1e6
            out[f"rand 4K QD{depth}"] = await ours_random(client, size, seconds, depth) / seconds
    return out


# --- references ---------------------------------------------------------------------------


def run_libnbd(uri: str, size: int, seconds: float) -> dict[str, float]:
    sys.path.append("/usr/lib/python3/dist-packages")
    try:
        import nbd  # type: ignore[import-not-found]
    except ImportError:
        print("libnbd python binding not found (apt-get install python3-libnbd)")
        return {}
    h = nbd.NBD()
    h.connect_uri(uri)
    out: dict[str, float] = {}
    for request in (MiB, 128 << 10):
        t = time.perf_counter()
        for off in range(0, size, request):
            h.pread(request, off)
        out[f"seq {request >> 10}K QD1"] = size / (time.perf_counter() - t) / 1e6
    rng = random.Random(0)
    count, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        h.pread(4096, rng.randrange(size // 4096) * 4096)
        count += 1
    out["rand 4K QD1"] = count / seconds
    h.shutdown()
    return out


def run_nbdcopy(uri: str, size: int) -> dict[str, float]:
    if not shutil.which("nbdcopy"):
        return {}
    out: dict[str, float] = {}
    for request in (MiB, 128 << 10):
        t = time.perf_counter()
        subprocess.run(
            ["nbdcopy", "--no-extents", f"--request-size={request}", uri, "null:"],
            check=True,
            timeout=300,
        )
        out[f"seq {request >> 10}K"] = size / (time.perf_counter() - t) / 1e6
    return out


# --- report -------------------------------------------------------------------------------


def row(name: str, value: float | None, ref: float | None, unit: str) -> str:
    shown = f"{value:10.0f} {unit}" if value is not None else f"{'n/a':>10} {unit}"
    ratio = f"{value / ref:5.2f}x" if value and ref else "    -"
    return f"  {name:<30}{shown}   {ratio}"


def report(ours: dict[str, float], lib: dict[str, float], copy: dict[str, float]) -> None:
    print("\nratio = value / libnbd-python (synchronous pread, one request at a time)")
    for test, unit in (("seq 1024K", "MB/s"), ("seq 128K", "MB/s"), ("rand 4K", "IOPS")):
        ref = lib.get(f"{test} QD1")
        print(f"{test} reads:")
        print(row("libnbd-python pread", ref, ref, unit))
        print(row("ours QD1", ours.get(f"{test} QD1"), ref, unit))
        print(row("ours QD16", ours.get(f"{test} QD16"), ref, unit))
        if test in copy:
            print(row("nbdcopy (default parallelism)", copy[test], ref, unit))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {rss:.0f} MiB")


def best(into: dict[str, float], new: dict[str, float]) -> None:
    for key, value in new.items():
        into[key] = max(into.get(key, 0.0), value)


def with_server(size: int, body: Callable[[str], None]) -> None:
    d = tempfile.mkdtemp(prefix="bf-bench-")
    sock = os.path.join(d, "nbd.sock")
    proc = subprocess.Popen(["nbdkit", "-f", "-U", sock, "memory", str(size)])
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("nbdkit did not start")
            time.sleep(0.02)
        time.sleep(0.1)
        body(f"nbd+unix:///?socket={sock}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    args = parse_args()
    size = size_of(args.size)
    print(
        f"nbdkit memory {args.size} over a Unix socket; {os.cpu_count()} CPUs; "
        f"best of {args.rounds} rounds"
    )

    def body(uri: str) -> None:
        ours: dict[str, float] = {}
        lib: dict[str, float] = {}
        copy: dict[str, float] = {}
        for _ in range(args.rounds):
            best(ours, trio.run(run_ours, uri, size, args.seconds))
            best(lib, run_libnbd(uri, size, args.seconds))
            best(copy, run_nbdcopy(uri, size))
        report(ours, lib, copy)

    with_server(size, body)


if __name__ == "__main__":
    main()
