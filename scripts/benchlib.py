"""What the benchmark scripts share: tool checks and a ``blockfuse mount`` subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READY = "Stop with Ctrl-C"
"""The last line of the banner ``blockfuse mount`` prints once the mount is up."""


def need(tool: str, package: str) -> None:
    """Exit with how to install ``tool`` when it is missing."""
    if shutil.which(tool) is None:
        sys.exit(f"{tool} is missing: run scripts/setup (or apt-get install {package})")


def connectable(path: Path) -> bool:
    """A server listens on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def terminate(proc: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM ``proc``, SIGKILL after ``grace`` seconds; returns once it is gone."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop(proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """``terminate`` ``proc``, then make sure nothing is left mounted."""
    terminate(proc)
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False, timeout=30)


@contextmanager
def blockfuse_mount(
    mountpoint: Path,
    devices: Sequence[str],
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[int]:
    """``blockfuse mount`` with ``devices`` until the block ends; yields the process id."""
    cmd = [str(REPO / ".venv/bin/blockfuse"), "mount", str(mountpoint)]
    for device in devices:
        cmd += ["-d", device]
    log = mountpoint.parent / f"{mountpoint.name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, *extra], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    try:
        deadline = time.monotonic() + 60
        while READY not in log.read_text(errors="replace") or not is_mounted(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"blockfuse mount did not come up:\n{log.read_text(errors='replace')}")
            time.sleep(0.05)
        yield proc.pid
    finally:
        stop(proc, mountpoint)


def peak_rss_mib(pid: int) -> float:
    """The peak resident memory (VmHWM) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in ns (/proc/PID/task/*/schedstat)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended
    return total


@contextmanager
def tmpfs(where: Path, size: int) -> Iterator[Path]:
    """A private tmpfs of ``size`` bytes at ``where`` for the body: images held in memory,
    which the VM cannot page out (the page cache it can)."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextmanager
def pinned(*paths: Path) -> Iterator[None]:
    """Hold the page cache of ``paths`` in memory for the body: a helper process maps
    them and locks them with ``mlockall`` (the VM pages out idle page cache during a run,
    and a benchmark must not read a disk on one side only)."""
    code = "\n".join(
        [
            "import ctypes, mmap, os, signal, sys",
            "fds = [os.open(p, os.O_RDONLY) for p in sys.argv[1:]]",
            "maps = [mmap.mmap(fd, 0, prot=mmap.PROT_READ) for fd in fds]",
            "libc = ctypes.CDLL(None, use_errno=True)",
            "if libc.mlockall(3):",  # MCL_CURRENT | MCL_FUTURE
            "    sys.exit('mlockall failed: ' + os.strerror(ctypes.get_errno()))",
            "print('pinned', flush=True)",
            "signal.pause()",
        ]
    )
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, paths)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"pinned":
            sys.exit("could not pin the images in memory (mlockall)")
        yield
    finally:
        proc.kill()
        proc.wait()


def fio(path: Path, rw: str, bs: str, depth: int, runtime: int, size: int) -> tuple[float, int]:
    """fio with O_DIRECT (libaio) on the first ``size`` bytes of ``path`` for ``runtime``
    seconds: its IOPS and the number of requests done."""
    cmd = [
        "fio", "--name=bench", f"--filename={path}", "--direct=1", "--ioengine=libaio",
        f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", f"--size={size}",
        "--time_based", f"--runtime={runtime}", "--output-format=json",
        "--randrepeat=0", "--norandommap",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=runtime + 60)
    job = json.loads(out.stdout)["jobs"][0]
    side = job["read" if "read" in rw else "write"]
    return float(side["iops"]), int(side["total_ios"])


def make_random_image(path: Path, size: int) -> None:
    """``size`` random bytes (a whole number of 16 MiB) at ``path``."""
    with open(path, "wb") as f:
        for _ in range(size >> 24):
            f.write(os.urandom(1 << 24))


def print_ratio_table(
    jobs: Sequence[str],
    names: Sequence[str],
    reference: str,
    results: Mapping[tuple[str, str], Sequence[tuple[float, float]]],
) -> None:
    """Per job and side (``results[(job, side)]``: one ``(IOPS, µs per request)`` a
    round): the median IOPS, the median of the per-round ratios to ``reference``, and
    the median CPU µs per request."""
    width = max(len(n) for n in names) + 5
    print(
        f"{'job':<20}"
        + "".join(f" {n + ' IOPS':>{width}} {'x ' + reference:>12} {'µs/req':>7}" for n in names)
    )
    for job in jobs:
        ref = [iops for iops, _ in results[(job, reference)]]
        row = f"{job:<20}"
        for name in names:
            runs = results[(job, name)]
            ratios = [iops / r for (iops, _), r in zip(runs, ref, strict=True)]
            row += (
                f" {statistics.median(i for i, _ in runs):>{width}.0f}"
                f" {statistics.median(ratios):>11.2f}x"
                f" {statistics.median(u for _, u in runs):>7.1f}"
            )
        print(row, flush=True)
