"""Messages about the mountpoint, as users meet them (issue 17)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .mounting import blockfuse_command, mounted
from .timing import time_limit

limit = time_limit(60)
pytestmark = pytest.mark.e2e


def test_umount_of_a_file_in_the_mount_points_at_the_mount(tmp_path: Path) -> None:
    with mounted(tmp_path / "mnt", ["disk=mem(1M)"]):
        for given, mount in [("mnt/disk", "mnt"), ("./mnt/disk/", "./mnt"), ("mnt/x/y", "mnt")]:
            out = subprocess.run(
                blockfuse_command("umount", given), capture_output=True, text=True,
                cwd=tmp_path, timeout=30,
            )  # fmt: skip
            assert out.returncode == 1
            assert out.stderr == (
                f"blockfuse: {given} is not mounted; it is inside the blockfuse mount "
                f"{mount}: run: blockfuse umount {mount}\n"
            )


def test_mounting_over_a_directory_that_is_not_empty_warns(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "mnt" / "a").write_text("a")
    (tmp_path / "mnt" / "b").write_text("b")
    with mounted(tmp_path / "mnt", ["disk=mem(1M)"]) as m:
        out = m.output()
    assert f"{tmp_path / 'mnt'} is not empty: its 2 entries stay hidden under the mount" in out
    assert (tmp_path / "mnt" / "a").read_text() == "a"


def test_an_empty_mountpoint_draws_no_warning(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    with mounted(tmp_path / "mnt", ["disk=mem(1M)"]) as m:
        out = m.output()
    assert "not empty" not in out
