"""The write lock as users meet it: a remount right after a plain ``umount`` names the
blockfuse still closing; ``--read-only`` takes no lock (issue 17)."""

from __future__ import annotations

import errno
import subprocess
import time
from pathlib import Path

import pytest

from .mounting import blockfuse_command, mounted, run
from .test_image_locks import lock_is_free
from .test_mount_lifecycle_e2e import slow_closing_mirror
from .timing import time_limit

limit = time_limit(120)
pytestmark = pytest.mark.e2e


def test_a_remount_right_after_a_plain_umount_names_the_blockfuse_still_closing(
    short_tmp: Path,
) -> None:
    peer, spec = slow_closing_mirror(short_tmp)  # its secondary: short_tmp/s.img
    try:
        with mounted(short_tmp / "mnt", [spec]) as m:
            time.sleep(0.5)  # the copier's 3-second read is in flight
            run("umount", str(short_tmp / "mnt"))
            again = subprocess.run(
                blockfuse_command(
                    "mount", str(short_tmp / "mnt2"), "-d", f"disk=sparse({short_tmp}/s.img)"
                ),
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            still_closing = m.proc.poll() is None
            status = m.proc.wait(timeout=30)
            out = m.output()
    finally:
        peer.stop()
    assert still_closing and status == 0, out
    assert again.returncode == 1, again.stderr
    assert (
        f"s.img is still open in blockfuse pid {m.proc.pid}, which is unmounted and still "
        "flushing and closing its devices: wait for it to exit" in again.stderr
    )
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert not (short_tmp / "mnt2").exists()


def test_a_live_mount_holding_the_image_is_named_with_its_mountpoint(tmp_path: Path) -> None:
    image = tmp_path / "x.img"
    image.write_bytes(bytes(1 << 20))
    with mounted(tmp_path / "mnt", [f"disk={image}"]) as m:
        again = subprocess.run(
            blockfuse_command("mount", str(tmp_path / "mnt2"), "-d", f"disk={image}"),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        pid = m.proc.pid
    assert again.returncode == 1
    assert (
        f"{image} is in use by the blockfuse mount at {tmp_path / 'mnt'} (pid {pid}); "
        f"stop it first: blockfuse umount {tmp_path / 'mnt'}" in again.stderr
    )


def test_a_read_only_mount_takes_no_write_lock(tmp_path: Path) -> None:
    image = tmp_path / "x.img"
    image.write_bytes(bytes(1 << 20))
    devices = [f"a={image}", f"b=sparse({tmp_path}/y.img, size=1M)"]
    with mounted(tmp_path / "mnt", devices, ["--read-only"]) as m:
        assert lock_is_free(image) and lock_is_free(tmp_path / "y.img")
        with pytest.raises(OSError) as refused:
            open(m.path("a"), "r+b")  # noqa: SIM115
        assert refused.value.errno == errno.EROFS
        # a second read-only mount of the same images works too
        with mounted(tmp_path / "mnt2", devices, ["--read-only"]) as other:
            assert other.path("a").read_bytes() == bytes(1 << 20)
