"""End to end as a user runs it: losetup the flat file, mkfs.ext4, use it, e2fsck clean."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .conftest import require_tool
from .mounting import blockfuse_command, fs_mounted, loop_device, mounted, run

TIMEOUT = 120


def test_ext4_on_the_flat_file(tmp_path: Path) -> None:
    require_tool("mkfs.ext4", "e2fsprogs")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    files = {f"file{i}": os.urandom(300_000 + i * 4097) for i in range(20)}
    with mounted(tmp_path / "mnt", [f"disk={image}"]) as m, loop_device(m.path("disk")) as dev:
        run("mkfs.ext4", "-q", "-F", dev)
        with fs_mounted(dev, tmp_path / "fs") as fs:
            for name, data in files.items():
                (fs / name).write_bytes(data)
            (fs / "dir").mkdir()
            (fs / "dir" / "small").write_text("hello")
        with fs_mounted(dev, tmp_path / "fs") as fs:
            for name, data in files.items():
                assert (fs / name).read_bytes() == data
        fsck = subprocess.run(
            ["e2fsck", "-fn", dev], capture_output=True, text=True, timeout=TIMEOUT
        )
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # the image itself, after the mount is gone, is a clean filesystem too
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_sigterm_with_a_loop_device_attached_warns(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    with mounted(tmp_path / "mnt", [f"disk={image}"]) as m, loop_device(m.path("disk")) as dev:
        refused = subprocess.run(
            [*blockfuse_command("umount"), str(m.mountpoint)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert refused.returncode == 1 and f"detach first: losetup -d {dev}" in refused.stderr
        status = m.stop()
        assert status == 1
        assert f"{dev} still uses a file under" in m.output()
        assert f"losetup -d {dev}" in m.output()
