#!/usr/bin/env python3
"""fio through a sparse device vs a plain file device in the same mount, same run.

One ``blockfuse mount`` serves two new 1 GiB images, made the same way (an empty sparse
file), one as ``sparse=sparse(IMG1)`` and one as ``file=IMG2`` (an image written by two
devices at once is refused by its lock).  fio (O_DIRECT,
libaio, queue depth 4) runs sequential 1 MiB writes of random data and sequential 1 MiB
reads against each, alternating devices, ``--rounds`` times; the median MiB/s of each is
printed with the ratio sparse/file (target >= 0.9x) and the spread.  The machine's other
load moves single runs by 2x, hence many short alternating runs.  Then 1 MiB writes of
zeroes through each, with what the image holds on disk after each.
Then the mount process's memory (VmRSS and VmHWM from /proc/PID/status) for a 1 GiB and
a 1 TiB sparse device after the same I/O in the device's last GiB.  About 90 seconds.

    sudo .venv/bin/python scripts/bench_sparse.py [--runtime 2] [--rounds 5] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchlib import blockfuse_mount, need

GiB = 1 << 30

JOBS = [
    ("seq write 1M qd4", "write", []),
    ("seq read 1M qd4", "read", []),
]


def fio(path: Path, rw: str, extra: Sequence[str], runtime: float, offset: int = 0) -> float:
    """MiB/s of one fio job on ``path`` (1 MiB blocks, O_DIRECT, libaio, depth 4)."""
    cmd = [
        "fio", "--name=bench", f"--filename={path}", "--direct=1", "--ioengine=libaio",
        f"--rw={rw}", "--bs=1M", "--iodepth=4", f"--offset={offset}", f"--size={GiB}",
        "--time_based", f"--runtime={runtime}", "--ramp_time=1", "--output-format=json",
        *extra,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=runtime + 60)
    job = json.loads(out.stdout)["jobs"][0]
    return float(job["read" if rw == "read" else "write"]["bw_bytes"]) / (1 << 20)


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of process ``pid`` in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def allocated_mib(path: Path) -> float:
    return os.stat(path).st_blocks * 512 / (1 << 20)


def throughput(workdir: Path, runtime: float, rounds: int) -> None:
    images = {name: workdir / f"{name}.img" for name in ("sparse", "file")}
    for image in images.values():
        with open(image, "wb") as f:
            f.truncate(GiB)
    mnt = workdir / "mnt"
    devices = [f"sparse=sparse({images['sparse']})", f"file={images['file']}"]
    print(f"fio O_DIRECT libaio, {runtime:g}s per job, median of {rounds} rounds, in {workdir}")
    print(f"{'job':<24} {'sparse MiB/s':>13} {'file MiB/s':>11} {'ratio':>6}  spread (min-max)")
    with blockfuse_mount(mnt, devices):
        for label, rw, extra in JOBS:
            results: dict[str, list[float]] = {"sparse": [], "file": []}
            for i in range(rounds):
                order = ("sparse", "file") if i % 2 == 0 else ("file", "sparse")
                for name in order:
                    os.sync()  # no job pays for the writeback of the one before
                    results[name].append(fio(mnt / name, rw, extra, runtime))
            a, b = statistics.median(results["sparse"]), statistics.median(results["file"])
            spread = "  ".join(f"{min(v):.0f}-{max(v):.0f}" for v in results.values())
            print(f"{label:<24} {a:>13.0f} {b:>11.0f} {a / b:>5.2f}x  {spread}", flush=True)
        zeroes(mnt, images, runtime)


def zeroes(mnt: Path, images: dict[str, Path], runtime: float) -> None:
    """The same zero writes through each device, and what its image holds after."""
    row = []
    for name, image in images.items():
        os.sync()
        row.append(f"{name} {fio(mnt / name, 'write', ['--zero_buffers'], runtime):.0f} MiB/s, "
                   f"image then holds {allocated_mib(image):.0f} MiB")  # fmt: skip
    print("seq write zeroes 1M qd4:  " + ";  ".join(row))


def memory(workdir: Path, runtime: float) -> None:
    rows = []
    for label, size in (("1 GiB", GiB), ("1 TiB", 1 << 40)):
        image, mnt = workdir / f"mem-{size}.img", workdir / "mnt"
        with blockfuse_mount(mnt, [f"disk=sparse({image}, size={size})"]) as pid:
            idle = memory_mib(pid)
            for rw in ("write", "read"):
                fio(mnt / "disk", rw, [], runtime, offset=size - GiB)
            busy = memory_mib(pid)
        rows.append((label, idle["VmRSS"], busy["VmRSS"], busy["VmHWM"]))
        image.unlink()
    print(f"{'sparse device':<14} {'RSS idle':>9} {'RSS after I/O':>14} {'peak (VmHWM)':>13}")
    for label, idle_rss, rss, hwm in rows:
        print(f"{label:<14} {idle_rss:>7.1f}Mi {rss:>12.1f}Mi {hwm:>11.1f}Mi")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runtime", type=float, default=2, help="seconds per fio job")
    parser.add_argument("--rounds", type=int, default=5, help="runs per job and device")
    parser.add_argument("--dir", default="/var/tmp", help="where the images go (needs 2 GiB)")
    args = parser.parse_args()
    need("fio", "fio")
    workdir = Path(tempfile.mkdtemp(prefix="bf-bench-sparse-", dir=args.dir))
    try:
        throughput(workdir, args.runtime, args.rounds)
        memory(workdir, min(args.runtime, 2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
