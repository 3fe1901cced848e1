"""What the benchmark scripts share: tool checks and a ``blockfuse mount`` subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READY = "Stop with Ctrl-C"
"""The last line of the banner ``blockfuse mount`` prints once the mount is up."""


def need(tool: str, package: str) -> None:
    """Exit with how to install ``tool`` when it is missing."""
    if shutil.which(tool) is None:
        sys.exit(f"{tool} is missing: run scripts/setup (or apt-get install {package})")


def is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def stop(proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """SIGTERM ``proc`` (SIGKILL after 30 s), then make sure nothing is left mounted."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False, timeout=30)


@contextmanager
def blockfuse_mount(
    mountpoint: Path, devices: Sequence[str], extra: Sequence[str] = ()
) -> Iterator[int]:
    """``blockfuse mount`` with ``devices`` until the block ends; yields the process id."""
    cmd = [str(REPO / ".venv/bin/blockfuse"), "mount", str(mountpoint)]
    for device in devices:
        cmd += ["-d", device]
    log = mountpoint.parent / f"{mountpoint.name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*cmd, *extra], stdout=out, stderr=subprocess.STDOUT)
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
