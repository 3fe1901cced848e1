"""A mirror of a real NBD server, end to end: ext4 used during the copy, errors from nbdkit.

Slow (tens of seconds): nbdkit serves the primary with its ``rate`` filter (20 MB/s) so
the copy is still running while mkfs, mount and file writes go through the
loop-attached flat file; or with its ``error`` filter, switched on and off by a trigger
file.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .conftest import require_tool
from .mounting import attr, fs_mounted, loop_device, mounted, run, wait_attr
from .nbdpeers import Peer

pytestmark = pytest.mark.e2e

SIZE = 128 << 20


def cmp(*paths: Path) -> None:
    for other in paths[1:]:
        subprocess.run(["cmp", str(paths[0]), str(other)], check=True, timeout=60)


def nbdkit(directory: Path, image: Path, *filter_args: str) -> Peer:
    exe = require_tool("nbdkit", "nbdkit")
    filters = [a for a in filter_args if a.startswith("--filter")]
    params = [a for a in filter_args if not a.startswith("--filter")]
    return Peer([exe, "-f", "-U", "{sock}", *filters, "file", str(image), *params], directory)


def test_ext4_used_during_the_copy_from_a_throttled_nbdkit(short_tmp: Path) -> None:
    require_tool("mkfs.ext4", "e2fsprogs")
    require_tool("e2fsck", "e2fsprogs")
    primary, secondary, state = short_tmp / "p.img", short_tmp / "s.img", short_tmp / "map"
    primary.write_bytes(os.urandom(SIZE))  # all data, so the copy takes a while
    with nbdkit(short_tmp, primary, "--filter=rate", "rate=160M") as peer:
        spec = f"disk=mirror({peer.uri()}, sparse({secondary}), state={state}, chunk=256K)"
        files = {f"file{i}": os.urandom(200_000 + i * 4097) for i in range(12)}
        with mounted(short_tmp / "mnt", [spec]) as m:
            with loop_device(m.path("disk")) as dev:
                assert attr(m, "state") == "copying"
                run("mkfs.ext4", "-q", "-F", dev)
                with fs_mounted(dev, short_tmp / "fs") as fs:
                    for name, data in files.items():
                        (fs / name).write_bytes(data)
                assert attr(m, "state") == "copying", "the copy ended before ext4 was used"
                with fs_mounted(dev, short_tmp / "fs") as fs:
                    for name, data in files.items():
                        assert (fs / name).read_bytes() == data
                wait_attr(m, "state", lambda v: v == "synced", timeout=90)
                fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
                assert fsck.returncode == 0, fsck.stdout + fsck.stderr
            cmp(m.path("disk"), secondary)
            assert m.stop() == 0, m.output()  # the loop device is detached first
        cmp(primary, secondary)
        fsck = subprocess.run(["e2fsck", "-fn", str(secondary)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_nbdkit_read_errors_are_retried_then_fail_the_copy(short_tmp: Path) -> None:
    primary, secondary = short_tmp / "p.img", short_tmp / "s.img"
    primary.write_bytes(os.urandom(8 << 20))
    trigger = short_tmp / "errors-on"
    with nbdkit(
        short_tmp,
        primary,
        "--filter=error",
        "error-pread=EIO",
        "error-pread-rate=100%",
        f"error-pread-file={trigger}",
    ) as peer:
        spec = f"disk=mirror({peer.uri()}, sparse({secondary}), chunk=1M)"
        trigger.touch()
        with mounted(short_tmp / "mnt", [spec]) as m:
            wait_attr(m, "errors", lambda v: int(v) >= 2, timeout=30)
            assert attr(m, "state") == "copying"  # retrying
            trigger.unlink()  # the server recovers: the retries succeed
            wait_attr(m, "state", lambda v: v == "synced", timeout=30)
            cmp(primary, secondary)
        trigger.touch()
        secondary.unlink()
        with mounted(short_tmp / "mnt", [spec]) as m:
            wait_attr(m, "state", lambda v: v == "failed", timeout=60)
            reason = attr(m, "last_error")
            assert "EIO" in reason or "Input/output error" in reason, reason
            assert reason.endswith("(gave up after 6 tries)"), reason
            trigger.unlink()
            with open(m.path("disk"), "r+b") as f:  # the disk still works on the primary
                f.write(b"still here")
                f.flush()
                os.fsync(f.fileno())
                f.seek(0)
                assert f.read(10) == b"still here"
            assert attr(m, "state") == "failed"
            assert m.stop() == 0
        assert primary.read_bytes()[:10] == b"still here"
