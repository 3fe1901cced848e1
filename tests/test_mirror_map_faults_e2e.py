"""A copy map whose directory fills up or turns read-only under a live mount (issue 12,
defect 2): the copy fails, writes go on, and after kill -9 and a remount with the
directory usable again the map vouches for nothing stale."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockfuse.devices.mirror.mapfile import STALE_MARK, read_saved_map

from .conftest import small_tmpfs_at
from .mounting import MountProcess, mounted
from .timing import time_limit

SIZE = 8 << 20
limit = time_limit(120)
pytestmark = pytest.mark.e2e


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs for the map."""
    with small_tmpfs_at(tmp_path / "maps", "4M") as where:
        yield where


def attr(m: MountProcess, key: str) -> str:
    return os.getxattr(m.path("disk"), f"user.blockfuse.{key}").decode()


def wait_attr(m: MountProcess, key: str, prefix: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not (value := attr(m, key)).startswith(prefix):
        assert time.monotonic() < deadline, f"{key}={value!r}:\n{m.output()}"
        time.sleep(0.05)
    return value


def write_at(m: MountProcess, offset: int, data: bytes) -> None:
    fd = os.open(m.path("disk"), os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def kill_hard(m: MountProcess) -> None:
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(timeout=10)
    subprocess.run(["fusermount3", "-uz", str(m.mountpoint)], check=False)


def images(tmp_path: Path) -> tuple[Path, Path]:
    primary, secondary = tmp_path / "p.img", tmp_path / "s.img"
    primary.write_bytes(os.urandom(SIZE))
    with open(secondary, "wb") as f:
        f.truncate(SIZE)
    return primary, secondary


def break_then_write_then_crash(
    tmp_path: Path, state: Path, break_store: object, repair: object
) -> tuple[Path, Path]:
    """Sync a mirror, break its map's directory, write, kill -9, repair, remount, sync."""
    primary, secondary = images(tmp_path)
    spec = f"disk=mirror({primary}, {secondary}, chunk=64K, state={state})"
    with mounted(tmp_path / "mnt", [spec]) as m:
        wait_attr(m, "state", "synced")
        break_store()  # type: ignore[operator]
        write_at(m, 4096, b"new data the map could not record" * 100)
        assert wait_attr(m, "state", "failed") == "failed"
        assert attr(m, "last_error").startswith("cannot save the copy map")
        kill_hard(m)
    repair()  # type: ignore[operator]
    with mounted(tmp_path / "mnt", [spec]) as m:
        assert "copying anew" in attr(m, "notice"), "a map that could not record writes"
        wait_attr(m, "state", "synced")
        m.stop()
    return primary, secondary


def test_a_full_map_directory(tmp_path: Path, small_tmpfs: Path) -> None:
    filler = small_tmpfs / "filler"

    def fill() -> None:
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64K"], capture_output=True)

    def make_room() -> None:
        assert read_saved_map(str(small_tmpfs / "map")).invalidated  # overwritten in place
        filler.unlink()

    primary, secondary = break_then_write_then_crash(tmp_path, small_tmpfs / "map", fill, make_room)
    assert primary.read_bytes() == secondary.read_bytes()


def test_a_map_directory_that_turns_read_only(tmp_path: Path, small_tmpfs: Path) -> None:
    def remount(mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(small_tmpfs)], check=True)

    def make_writable() -> None:
        assert os.getxattr(tmp_path / "s.img", STALE_MARK).startswith(str(small_tmpfs).encode())
        remount("rw")

    primary, secondary = break_then_write_then_crash(
        tmp_path, small_tmpfs / "map", lambda: remount("ro"), make_writable
    )
    assert primary.read_bytes() == secondary.read_bytes()
    assert STALE_MARK not in os.listxattr(secondary), "the mark is gone once a new map is saved"
