#!/usr/bin/env python3
"""fio through blockfuse's FUSE file vs qemu-storage-daemon's FUSE export, same run.

Both serve a copy of the same 1 GiB image.  fio runs with O_DIRECT (libaio): sequential
1 MiB read and write at queue depth 4, random 4 KiB read and write at depth 1 and 16.
Prints IOPS side by side with the ratio, then the mount process's peak memory (VmHWM)
for a 1 GiB and a 1 TiB device.

Both images start from the same page-cache state (dropped, then read in whole), and
every fio job starts after a ``sync``: a freshly written image sits in the cache as large
folios, on which a 4 KiB ``pwrite`` costs ~23 µs instead of ~2 µs (ext4, kernel 6.18),
and that alone made the side with the fresh image look 3x slower at random writes.

    sudo .venv/bin/python scripts/bench_fuse.py [--runtime 5] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchlib import blockfuse_mount, is_mounted, need, peak_rss_mib, stop

IMAGE_SIZE = 1 << 30

JOBS = [
    ("seq read 1M qd4", "read", "1M", 4),
    ("seq write 1M qd4", "write", "1M", 4),
    ("rand read 4K qd1", "randread", "4k", 1),
    ("rand read 4K qd16", "randread", "4k", 16),
    ("rand write 4K qd1", "randwrite", "4k", 1),
    ("rand write 4K qd16", "randwrite", "4k", 16),
]


@contextmanager
def file_mount(image: Path, mountpoint: Path) -> Iterator[tuple[Path, int]]:
    with blockfuse_mount(mountpoint, [f"disk={image}"]) as pid:
        yield mountpoint / "disk", pid


@contextmanager
def qsd_export(image: Path, target: Path) -> Iterator[tuple[Path, int]]:
    target.touch()
    cmd = [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=f0,filename={image}",
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


def fio(path: Path, rw: str, bs: str, depth: int, runtime: int) -> float:
    cmd = [
        "fio", "--name=bench", f"--filename={path}", "--direct=1", "--ioengine=libaio",
        f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", f"--size={IMAGE_SIZE}",
        "--time_based", f"--runtime={runtime}", "--ramp_time=1", "--output-format=json",
        "--randrepeat=0", "--norandommap",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=runtime + 60)
    job = json.loads(out.stdout)["jobs"][0]
    side = "read" if "read" in rw else "write"
    return float(job[side]["iops"])


def make_image(path: Path) -> None:
    with open(path, "wb") as f:
        for _ in range(IMAGE_SIZE >> 24):
            f.write(os.urandom(1 << 24))


def same_cache_state(*images: Path) -> None:
    """Write back and drop the page cache, then read ``images`` in whole."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")
    for image in images:
        with open(image, "rb") as f:
            while f.read(1 << 24):
                pass


def run(workdir: Path, runtime: int) -> None:
    ours_img, ref_img = workdir / "ours.img", workdir / "ref.img"
    make_image(ours_img)
    shutil.copyfile(ours_img, ref_img)
    same_cache_state(ours_img, ref_img)
    print(f"fio O_DIRECT libaio, {runtime}s per job, 1 GiB image copies in {workdir}")
    print(f"{'job':<20} {'blockfuse IOPS':>15} {'qsd IOPS':>12} {'ratio':>7}")
    with (
        file_mount(ours_img, workdir / "mnt") as (ours, pid),
        qsd_export(ref_img, workdir / "qsd-export") as (ref, _),
    ):
        for label, rw, bs, depth in JOBS:
            os.sync()  # no job pays for the writeback of the one before
            a = fio(ours, rw, bs, depth, runtime)
            os.sync()
            b = fio(ref, rw, bs, depth, runtime)
            print(f"{label:<20} {a:>15.0f} {b:>12.0f} {a / b:>6.2f}x", flush=True)
        rss_small = peak_rss_mib(pid)
    big = workdir / "big.img"
    with open(big, "wb") as f:
        f.truncate(1 << 40)
    with file_mount(big, workdir / "mnt") as (ours, pid):
        fio(ours, "randread", "4k", 16, 2)
        rss_big = peak_rss_mib(pid)
    print(f"mount process peak RSS: {rss_small:.1f} MiB (1 GiB device, after all jobs), "
          f"{rss_big:.1f} MiB (1 TiB device)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    parser.add_argument("--dir", default="/var/tmp", help="where the images go (needs 2 GiB)")
    args = parser.parse_args()
    need("fio", "fio")
    need("qemu-storage-daemon", "qemu-system-common")
    workdir = Path(tempfile.mkdtemp(prefix="bf-bench-", dir=args.dir))
    try:
        run(workdir, args.runtime)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
