#!/usr/bin/env python3
"""An NBD export as a flat file: blockfuse's mount of ``nbd+unix://`` vs libnbd's nbdfuse.

One ``nbdkit file`` export of a 1 GiB random image on a private tmpfs (this VM pages out
idle page cache during a run; tmpfs it cannot), on a Unix socket, is shown as a file
twice: by ``blockfuse mount -d disk=nbd+unix:///?socket=...`` and by ``nbdfuse`` (its
default: 4 connections when the server allows several, as nbdkit's file plugin does).
fio reads each file with O_DIRECT (libaio): 4 KiB random reads at depth 1 and 16, 1 MiB
sequential reads at depth 4.  Each round runs every job on both sides in a rotated
order; the table gives medians over the rounds of IOPS, of the per-round ratio to
nbdfuse, and of the front end's CPU time per request (our mount, or nbdfuse; from
/proc/PID/task/*/schedstat; nbdkit's CPU is not counted on either side).

    sudo .venv/bin/python scripts/bench_nbdfuse.py [--rounds 3] [--runtime 5]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from benchlib import (
    blockfuse_mount,
    cpu_ns,
    fio,
    is_mounted,
    make_random_image,
    need,
    print_ratio_table,
    stop,
    tmpfs,
)

IMAGE_SIZE = 1 << 30

JOBS = [
    ("rand read 4K qd1", "randread", "4k", 1),
    ("rand read 4K qd16", "randread", "4k", 16),
    ("seq read 1M qd4", "read", "1M", 4),
]


@contextmanager
def nbdkit(image: Path, socket: Path) -> Iterator[str]:
    """``nbdkit file`` serving ``image`` on ``socket``; yields the export's URI."""
    proc = subprocess.Popen(
        ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(socket), "file", str(image)],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("nbdkit did not come up")
            time.sleep(0.05)
        yield f"nbd+unix:///?socket={socket}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def ours(uri: str, mountpoint: Path) -> Iterator[tuple[Path, int]]:
    with blockfuse_mount(mountpoint, [f"disk={uri}"]) as pid:
        yield mountpoint / "disk", pid


@contextmanager
def nbdfuse(uri: str, mountpoint: Path) -> Iterator[tuple[Path, int]]:
    mountpoint.mkdir()
    proc = subprocess.Popen(["nbdfuse", str(mountpoint), uri], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("nbdfuse did not come up")
            time.sleep(0.05)
        yield mountpoint / "nbd", proc.pid
    finally:
        stop(proc, mountpoint)


def run(workdir: Path, rounds: int, runtime: int) -> None:
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with ExitStack() as stack:
        store = stack.enter_context(tmpfs(workdir / "store", IMAGE_SIZE + (64 << 20)))
        make_random_image(store / "disk.img", IMAGE_SIZE)
        uri = stack.enter_context(nbdkit(store / "disk.img", workdir / "nbdkit.sock"))
        sides = {
            "blockfuse": stack.enter_context(ours(uri, workdir / "mnt")),
            "nbdfuse": stack.enter_context(nbdfuse(uri, workdir / "nbdfuse")),
        }
        names = list(sides)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for label, rw, bs, depth in JOBS:
                for name in order:
                    path, pid = sides[name]
                    before = cpu_ns(pid)
                    iops, ios = fio(path, rw, bs, depth, runtime, IMAGE_SIZE)
                    us = (cpu_ns(pid) - before) / 1000 / max(ios, 1)
                    results.setdefault((label, name), []).append((iops, us))
    report(results, names, rounds, runtime)


def report(
    results: dict[tuple[str, str], list[tuple[float, float]]],
    names: list[str],
    rounds: int,
    runtime: int,
) -> None:
    print(f"fio O_DIRECT libaio through the flat file of one nbdkit file export, {runtime} s "
          f"per job, {rounds} rounds (rotated order); medians")  # fmt: skip
    print_ratio_table([label for label, *_ in JOBS], names, "nbdfuse", results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    args = parser.parse_args()
    need("fio", "fio")
    need("nbdkit", "nbdkit")
    need("nbdfuse", "libnbd-bin")
    workdir = Path(tempfile.mkdtemp(prefix="bf-bench-", dir="/var/tmp"))
    try:
        run(workdir, args.rounds, args.runtime)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
