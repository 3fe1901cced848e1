"""Run ``blockfuse mount`` as a real subprocess for FUSE tests, and always stop it.

pyfuse3 allows one mount per process, and a real mount is what users run, so FUSE tests
start the CLI in a child process, wait until its files appear, and stop it by PID in
the fixture's finalizer (also when the test fails).  A mount that outlives its process
is cleared with ``fusermount3 -uz``.  ``loop_device`` and ``fs_mounted`` put a
filesystem on a mounted flat file, as a user does, and undo it also when a check fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from blockfuse.fuse.mountpoint import mount_type

from .conftest import require_tool

READY = "Stop with Ctrl-C"
"""The last line of the banner ``blockfuse mount`` prints once the mount is up."""


class MountProcess:
    def __init__(self, proc: subprocess.Popen[str], mountpoint: Path, log: Path) -> None:
        self.proc = proc
        self.mountpoint = mountpoint
        self.log = log

    def path(self, name: str) -> Path:
        return self.mountpoint / name

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal the mount process and wait for it; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def is_mounted(path: Path) -> bool:
    return mount_type(str(path)) is not None


def attr(m: MountProcess, key: str, name: str = "disk") -> str:
    """The status attribute ``user.blockfuse.KEY`` of the mount's file ``name``."""
    return os.getxattr(m.path(name), f"user.blockfuse.{key}").decode()


def wait_attr(
    m: MountProcess, key: str, ok: Callable[[str], bool], timeout: float = 30, name: str = "disk"
) -> str:
    """Poll ``attr(m, key, name)`` until ``ok`` says yes; its value then."""
    deadline = time.monotonic() + timeout
    while not ok(value := attr(m, key, name)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{key}={value!r} after {timeout}s:\n{m.output()}")
        time.sleep(0.05)
    return value


def blockfuse_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "blockfuse.cli", *args]


def wait_for(condition, timeout: float, what: str, proc: MountProcess) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.proc.poll() is not None:
            raise AssertionError(f"blockfuse exited ({proc.proc.returncode}):\n{proc.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{proc.output()}")
        time.sleep(0.02)


@contextmanager
def mounted(
    mountpoint: Path,
    devices: Sequence[str] = (),
    extra: Sequence[str] = (),
    timeout: float = 20,
    cwd: Path | None = None,
) -> Iterator[MountProcess]:
    """``blockfuse mount MOUNTPOINT --device ...`` running for the body of the block."""
    log = mountpoint.parent / f"{mountpoint.name}.log"
    args = ["mount", str(mountpoint)]
    for d in devices:
        args += ["--device", d]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            blockfuse_command(*args, *extra),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
        )
    m = MountProcess(proc, mountpoint, log)
    try:
        wait_for(lambda: READY in m.output() and is_mounted(mountpoint), timeout, "the mount", m)
        yield m
    finally:
        try:
            stop_process(proc)
        finally:  # unmount even if stopping was interrupted (e.g. by a test time limit)
            if is_mounted(mountpoint):
                subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)


def stop_process(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(*cmd: str, timeout: float = 120) -> str:
    """Run ``cmd`` to its end; its output.  A failure or a hang raises."""
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout).stdout


@contextmanager
def loop_device(path: Path) -> Iterator[str]:
    """``path`` attached to a free loop device for the body of the block."""
    dev = run(require_tool("losetup", "util-linux"), "-f", "--show", str(path)).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False, timeout=120)


@contextmanager
def fs_mounted(dev: str, where: Path) -> Iterator[Path]:
    """The ext4 filesystem on ``dev`` mounted at ``where`` for the body of the block
    (unmounted lazily if it is still busy)."""
    where.mkdir(exist_ok=True)
    run("mount", "-t", "ext4", dev, str(where))
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], check=False, timeout=120).returncode:
            subprocess.run(["umount", "-l", str(where)], check=False, timeout=120)
