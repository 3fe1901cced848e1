#!/usr/bin/env python3
"""fio through blockfuse's FUSE file vs qemu-storage-daemon's FUSE export, interleaved.

Both serve a copy of the same 1 GiB image on the same filesystem, pinned in the page
cache (a helper maps and ``mlockall``s them: this VM pages out idle page cache during a
run, and neither side may read a disk).  Both copies are made the same way and read in
whole, so their pages are alike (a 4 KiB write into a large folio costs several times one
into a small page).  fio runs with O_DIRECT (libaio).  Each round runs every job on every
side in a rotated order; the
table gives, per job, the median over rounds of IOPS, of the per-round ratio to qsd,
and of the server's CPU time per request (from /proc/PID/task/*/schedstat: steadier
than IOPS on this VM, where idle vCPUs halt and a lone request's latency is bimodal).

    sudo .venv/bin/python scripts/bench_fuse.py [--rounds 3] [--runtime 5] [--stock]

``--stock`` adds blockfuse with pyfuse3's stock request loop (BLOCKFUSE_STOCK_FUSE_LOOP=1);
``--tree PATH`` adds blockfuse from another checkout (an A/B of a change, in one run);
``--only TEXT`` runs the jobs whose name holds TEXT (given again: either).
"""

from __future__ import annotations

import argparse
import os
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
    peak_rss_mib,
    pinned,
    print_ratio_table,
    stop,
)

IMAGE_SIZE = 1 << 30

JOBS = [
    ("rand read 4K qd1", "randread", "4k", 1),
    ("rand read 4K qd16", "randread", "4k", 16),
    ("rand write 4K qd1", "randwrite", "4k", 1),
    ("rand write 4K qd16", "randwrite", "4k", 16),
    ("seq read 1M qd4", "read", "1M", 4),
    ("seq write 1M qd4", "write", "1M", 4),
]


@contextmanager
def ours(image: Path, mountpoint: Path, env: dict[str, str]) -> Iterator[tuple[Path, int]]:
    with blockfuse_mount(mountpoint, [f"disk={image}"], env=env) as pid:
        yield mountpoint / "disk", pid


@contextmanager
def qsd(image: Path, target: Path) -> Iterator[tuple[Path, int]]:
    target.touch()
    cmd = [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=f0,filename={image},cache.direct=off",
        "--export", f"type=fuse,id=e0,node-name=f0,mountpoint={target},writable=on",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(target):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("qemu-storage-daemon did not come up")
            time.sleep(0.05)
        yield target, proc.pid
    finally:
        stop(proc, target)


def side_envs(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """blockfuse's sides by name, each with the environment its mount runs in."""
    envs: dict[str, dict[str, str]] = {"blockfuse": {}}
    if args.stock:
        envs["blockfuse (stock loop)"] = {"BLOCKFUSE_STOCK_FUSE_LOOP": "1"}
    if args.tree:
        envs[f"blockfuse ({Path(args.tree).name})"] = {"PYTHONPATH": str(Path(args.tree).resolve())}
    return envs


def run(workdir: Path, args: argparse.Namespace) -> None:
    rounds, runtime = args.rounds, args.runtime
    jobs = [job for job in JOBS if not args.only or any(t in job[0] for t in args.only)]
    envs = side_envs(args)
    base = workdir / "base.img"
    sides = {name: workdir / f"side{i}.img" for i, name in enumerate(["qsd", *envs])}
    make_random_image(base, IMAGE_SIZE)
    for image in sides.values():
        shutil.copyfile(base, image)  # every copy made alike: same kind of pages
    base.unlink()
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")  # then read in whole, alike
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with ExitStack() as stack:
        stack.enter_context(pinned(*sides.values()))
        paths = {
            name: stack.enter_context(
                qsd(image, workdir / "qsd-export") if name == "qsd"
                else ours(image, image.with_suffix(".mnt"), envs[name])
            )
            for name, image in sides.items()
        }  # fmt: skip
        names = [*envs, "qsd"]
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for label, rw, bs, depth in jobs:
                for name in order:
                    os.sync()  # no job pays for the writeback of the one before
                    path, pid = paths[name]
                    before = cpu_ns(pid)
                    iops, ios = fio(path, rw, bs, depth, runtime, IMAGE_SIZE)
                    us = (cpu_ns(pid) - before) / 1000 / max(ios, 1)
                    results.setdefault((label, name), []).append((iops, us))
        rss = peak_rss_mib(paths["blockfuse"][1])
    report(results, names, [label for label, *_ in jobs], args, rss)


def report(
    results: dict[tuple[str, str], list[tuple[float, float]]],
    names: list[str],
    jobs: list[str],
    args: argparse.Namespace,
    rss: float,
) -> None:
    print(f"fio O_DIRECT libaio, {args.runtime} s per job, {args.rounds} rounds (rotated order), "
          "images pinned in memory; medians")  # fmt: skip
    print_ratio_table(jobs, names, "qsd", results)
    print(f"blockfuse mount's peak RSS after all jobs: {rss:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    parser.add_argument("--stock", action="store_true", help="also pyfuse3's stock loop")
    parser.add_argument("--tree", help="also blockfuse from this checkout")
    parser.add_argument("--only", action="append", metavar="TEXT", help="jobs named with TEXT")
    args = parser.parse_args()
    need("fio", "fio")
    need("qemu-storage-daemon", "qemu-system-common")
    workdir = Path(tempfile.mkdtemp(prefix="bf-bench-", dir="/var/tmp"))
    try:
        run(workdir, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
