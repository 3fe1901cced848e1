#!/usr/bin/env python3
"""Our NBD client vs libnbd's Python binding, side by side on one server, interleaved.

The server is ``nbdkit file`` over an image of random bytes on tmpfs (/dev/shm: held in
memory, which this VM cannot page out, unlike page cache).  Each job runs each client
in a process of its own, for ``--seconds``, in an order rotated every round; a process
measures its own CPU time over the timed loop (/proc/self/task/*/schedstat, every
thread), so the client's CPU µs per request is printed next to its rate.  The table
gives, per job, the medians over rounds of each client's rate, of the per-round ratio
ours / libnbd, and of CPU µs per request.

- ``rand 4K qd1``: 4 KiB reads at random aligned offsets, one in flight (libnbd's
  synchronous ``pread``; ours, one trio task calling ``pread``).
- ``rand 4K qd16``: the same with 16 in flight (libnbd: ``aio_pread`` on 16 buffers,
  ``poll`` and ``aio_peek_command_completed``; ours: 16 trio tasks).
- ``seq 1M qd1``: 1 MiB reads one after another, wrapping at the image's end.

    .venv/bin/python scripts/bench_nbd.py [--rounds 3] [--seconds 3] [--size 512M]
        [--tree PATH]   # "ours" from another checkout (a base to compare with)
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
from contextlib import ExitStack, contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
BLOCK = 4096
JOBS = [("rand 4K qd1", BLOCK, 1, True), ("rand 4K qd16", BLOCK, 16, True),
        ("seq 1M qd1", MiB, 1, False)]  # fmt: skip
CLIENTS = ("ours", "libnbd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="512M", help="image size (default 512M)")
    p.add_argument("--seconds", type=float, default=3.0, help="time per job and client")
    p.add_argument("--rounds", type=int, default=3, help="rounds, in rotated order")
    p.add_argument("--tree", default=str(HERE.parent), help="checkout whose client is ours")
    p.add_argument("--child", nargs=5, metavar=("CLIENT", "URI", "BS", "DEPTH", "RANDOM"))
    return p.parse_args(argv)


def size_of(text: str) -> int:
    units = {"K": 10, "M": 20, "G": 30}
    return int(text[:-1]) << units[text[-1].upper()] if text[-1].isalpha() else int(text)


def cpu_ns_self() -> int:
    """CPU time of every thread of this process so far, in ns."""
    total = 0
    for stat in Path("/proc/self/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


class Offsets:
    """Where the next read goes: random aligned blocks, or one after another."""

    def __init__(self, size: int, bs: int, rand: bool, seed: int) -> None:
        self._blocks = size // bs
        self._bs = bs
        self._rand = random.Random(seed) if rand else None
        self._next = seed * 7919 % self._blocks

    def __call__(self) -> int:
        if self._rand is not None:
            return self._rand.randrange(self._blocks) * self._bs
        self._next = (self._next + 1) % self._blocks
        return self._next * self._bs


# --- the clients, each in a process of its own ----------------------------------------------


def child_ours(uri: str, size: int, bs: int, depth: int, rand: bool, seconds: float) -> dict:
    import trio

    from blockfuse.nbd.uri import parse_uri
    from blockfuse.transport.connect import open_nbd_client

    async def main() -> dict:
        async with open_nbd_client(parse_uri(uri)) as client:
            count = 0
            stop_at = 0.0

            async def worker(seed: int) -> None:
                nonlocal count
                where = Offsets(size, bs, rand, seed)
                buf = memoryview(bytearray(bs))
                while time.perf_counter() < stop_at:
                    await client.pread(buf, where())
                    count += 1

            await trio.sleep(0.1)  # the reader task started (and parked)
            cpu, t = cpu_ns_self(), time.perf_counter()
            stop_at = t + seconds
            async with trio.open_nursery() as n:
                for i in range(depth):
                    n.start_soon(worker, i)
            return measured(count, bs, time.perf_counter() - t, cpu_ns_self() - cpu)

    return trio.run(main)


def child_libnbd(uri: str, size: int, bs: int, depth: int, rand: bool, seconds: float) -> dict:
    sys.path.append("/usr/lib/python3/dist-packages")
    import nbd  # type: ignore[import-not-found]

    h = nbd.NBD()
    h.connect_uri(uri)
    where = Offsets(size, bs, rand, 0)
    cpu, t = cpu_ns_self(), time.perf_counter()
    stop_at = t + seconds
    if depth == 1:
        count = 0
        while time.perf_counter() < stop_at:
            h.pread(bs, where())
            count += 1
    else:
        count = libnbd_aio(h, nbd.Buffer, where, bs, depth, stop_at)
    result = measured(count, bs, time.perf_counter() - t, cpu_ns_self() - cpu)
    h.shutdown()
    return result


def libnbd_aio(h, buffer, where: Callable[[], int], bs: int, depth: int, stop_at: float) -> int:  # type: ignore[no-untyped-def]
    bufs = [buffer(bs) for _ in range(depth)]
    owner = {h.aio_pread(buf, where()): buf for buf in bufs}
    count = 0
    while owner:
        h.poll(-1)
        while owner and (cookie := h.aio_peek_command_completed()) > 0:
            h.aio_command_completed(cookie)
            count += 1
            buf = owner.pop(cookie)
            if time.perf_counter() < stop_at:
                owner[h.aio_pread(buf, where())] = buf
    return count


def measured(count: int, bs: int, seconds: float, cpu: int) -> dict:
    return {"rate": count / seconds, "mbs": count * bs / seconds / 1e6, "cpu_us": cpu / 1e3 / count}


def run_child(args: argparse.Namespace) -> None:
    client, uri, bs, depth, rand = args.child
    run = child_ours if client == "ours" else child_libnbd
    out = run(uri, size_of(args.size), int(bs), int(depth), rand == "1", args.seconds)
    if client == "ours":
        import blockfuse

        out["tree"] = str(Path(blockfuse.__file__).parent.parent)
    print(json.dumps(out))


def one(args: argparse.Namespace, client: str, uri: str, job: tuple) -> dict:
    _, bs, depth, rand = job
    cmd = [sys.executable, __file__, "--size", args.size, "--seconds", str(args.seconds),
           "--child", client, uri, str(bs), str(depth), "1" if rand else "0"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": args.tree}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if out.returncode:
        sys.exit(f"{client} {job[0]} failed:\n{out.stderr}")
    result: dict = json.loads(out.stdout.splitlines()[-1])
    if client == "ours" and Path(result["tree"]) != Path(args.tree).resolve():
        sys.exit(f"ours ran from {result['tree']}, not {args.tree}")
    return result


# --- the server and the report --------------------------------------------------------------


@contextmanager
def image(size: int) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="bf-bench-", dir="/dev/shm"))
    path = d / "disk.img"
    with open(path, "wb") as f:
        for _ in range(0, size, 16 * MiB):
            f.write(os.urandom(min(16 * MiB, size)))
        f.truncate(size)
    try:
        yield path
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def nbdkit(path: Path) -> Iterator[str]:
    d = Path(tempfile.mkdtemp(prefix="bf-sock-", dir="/tmp"))
    sock, pidfile = d / "nbd.sock", d / "pid"
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "-P", str(pidfile), "file",
                             str(path)])  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not pidfile.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                sys.exit("nbdkit did not start")
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def report(results: dict[tuple[str, str], list[dict]], args: argparse.Namespace) -> None:
    print(f"nbdkit file on tmpfs ({args.size}), Unix socket; {args.seconds:g} s per job, "
          f"{args.rounds} rounds (rotated order); medians; ours from {args.tree}")  # fmt: skip
    print(f"{'job':<14}{'ours':>12}{'libnbd':>12}{'ours/libnbd':>13}"
          f"{'ours µs/req':>13}{'libnbd µs/req':>15}")  # fmt: skip
    for label, bs, _, _ in JOBS:
        key, unit = ("mbs", " MB/s") if bs >= MiB else ("rate", " IOPS")
        ratios = per_round(results, label, key)
        med = {n: statistics.median(x[key] for x in results[(label, n)]) for n in CLIENTS}
        cpu = {n: statistics.median(x["cpu_us"] for x in results[(label, n)]) for n in CLIENTS}
        print(f"{label:<14}{med['ours']:>7.0f}{unit}{med['libnbd']:>7.0f}{unit}"
              f"{statistics.median(ratios):>12.2f}x"
              f"{cpu['ours']:>13.1f}{cpu['libnbd']:>15.1f}")  # fmt: skip
        print(f"{'':<14}per-round ratios: " + " ".join(f"{r:.2f}" for r in ratios))


def per_round(results: dict[tuple[str, str], list[dict]], label: str, key: str) -> list[float]:
    pairs = zip(results[(label, "ours")], results[(label, "libnbd")], strict=True)
    return [ours[key] / lib[key] for ours, lib in pairs]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    results: dict[tuple[str, str], list[dict]] = {}
    with ExitStack() as stack:
        path = stack.enter_context(image(size_of(args.size)))
        uri = stack.enter_context(nbdkit(path))
        for r in range(args.rounds):
            order = CLIENTS[r % 2 :] + CLIENTS[: r % 2]
            for job in JOBS:
                for client in order:
                    results.setdefault((job[0], client), []).append(one(args, client, uri, job))
        report(results, args)
    return None


if __name__ == "__main__":
    main()
