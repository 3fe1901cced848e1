"""The mount's edges of life: signals that arrive while devices are closing, and a mount
that the kernel refuses (issue 12, defects 4 and 5)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import require_tool
from .mounting import blockfuse_command, is_mounted, mounted
from .nbdpeers import Peer
from .timing import time_limit

limit = time_limit(120)
pytestmark = pytest.mark.e2e

STILL_CLOSING = "still closing devices; press Ctrl-C again to abort"


def slow_closing_mirror(short_tmp: Path) -> tuple[Peer, str]:
    """A mirror whose copier has a 3-second read in flight whenever it is stopped."""
    exe = require_tool("nbdkit", "nbdkit")
    primary = short_tmp / "p.img"
    primary.write_bytes(os.urandom(8 << 20))
    peer = Peer(
        [exe, "-f", "-U", "{sock}", "--filter=delay", "file", str(primary), "delay-read=3"],
        short_tmp,
    )
    return peer, f"disk=mirror({peer.uri()}, sparse({short_tmp}/s.img), chunk=1M)"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_while_closing_says_so_and_the_close_ends_cleanly(
    short_tmp: Path, sig: signal.Signals
) -> None:
    peer, spec = slow_closing_mirror(short_tmp)
    try:
        with mounted(short_tmp / "mnt", [spec]) as m:
            time.sleep(0.5)  # the first chunk's read is in flight
            m.proc.send_signal(sig)
            time.sleep(0.3)
            m.proc.send_signal(sig)
            status = m.proc.wait(timeout=30)
            out = m.output()
    finally:
        peer.stop()
    assert status == 0, out
    assert out.count(STILL_CLOSING) == 1, out
    assert "Traceback" not in out and "unmounted" in out, out
    assert not is_mounted(short_tmp / "mnt")


def test_a_third_signal_aborts_the_close_at_once(short_tmp: Path) -> None:
    peer, spec = slow_closing_mirror(short_tmp)
    try:
        with mounted(short_tmp / "mnt", [spec]) as m:
            time.sleep(0.5)
            for _ in range(3):
                m.proc.send_signal(signal.SIGINT)
                time.sleep(0.2)
            started = time.monotonic()
            status = m.proc.wait(timeout=30)
            waited = time.monotonic() - started
            out = m.output()
    finally:
        peer.stop()
    assert status == 1 and waited < 2, out
    assert "aborted while closing devices" in out and "Traceback" not in out, out
    assert not is_mounted(short_tmp / "mnt")


def test_a_mount_the_kernel_refuses_leaves_nothing_behind(tmp_path: Path) -> None:
    """Without the right to mount (a user namespace that maps no root), the error says
    why, does not blame /dev/fuse, and the mountpoint and image it created are gone."""
    unshare = require_tool("unshare", "util-linux")
    if shutil.which("fusermount3") is None:
        pytest.fail("fusermount3 is not installed: run scripts/setup (or apt-get install fuse3)")
    result = subprocess.run(
        [unshare, "--user", "--map-user=1000", "--map-group=1000",
         *blockfuse_command("mount", "./mnt")],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "cannot mount" in last and "Operation not permitted" in last, result.stderr
    assert "/dev/fuse" not in last, result.stderr
    assert sorted(os.listdir(tmp_path)) == [], "the mountpoint and the image it created"
