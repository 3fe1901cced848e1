"""A mirror through a real mount: xattrs, status, pivot, SIGTERM and kill -9 with resume."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from pathlib import Path

import pytest

from blockfuse.devices.mirror.mapfile import read_saved_map

from .mounting import attr, blockfuse_command, is_mounted, mounted, wait_attr, wait_for

SIZE = 32 << 20


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    primary, secondary = tmp_path / "p.img", tmp_path / "s.img"
    primary.write_bytes(os.urandom(SIZE))
    with open(secondary, "wb") as f:
        f.truncate(SIZE)
    return primary, secondary


def copied_in_map(state: Path) -> int:
    """How many sectors the map file at ``state`` calls copied."""
    return read_saved_map(str(state)).copied.total


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(blockfuse_command(*args), capture_output=True, text=True, timeout=30)


def test_status_and_pivot_through_the_mount(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    p, s = pair
    spec = f"disk=mirror({p}, {s}, rate=8M)"
    with mounted(tmp_path / "mnt", [spec, "ram=mem(1M)"]) as m:
        assert attr(m, "state") == "copying" and attr(m, "kind") == "mirror"
        assert attr(m, "total") == str(SIZE)
        refused = cli("pivot", str(m.path("disk")))
        assert refused.returncode == 1
        assert "cannot pivot" in refused.stderr and "copying" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        report = cli("status", str(m.mountpoint))
        assert report.returncode == 0
        assert "disk: mirror, 32 MiB" in report.stdout and "ram: memory, 1 MiB" in report.stdout
        assert "copying" in report.stdout
        with open(m.path("disk"), "r+b") as f:  # writes during the copy
            f.seek(SIZE - 5000)
            f.write(b"tail" * 1000)
            f.seek(0)
            f.write(b"head" * 1000)
        wait_attr(m, "state", lambda v: v == "synced")
        assert attr(m, "progress") == "100"
        assert p.read_bytes() == s.read_bytes()
        with pytest.raises(OSError) as info:
            os.setxattr(m.path("ram"), "user.blockfuse.pivot", b"1")
        assert info.value.errno == errno.EPERM
        done = cli("pivot", str(m.path("disk")))
        assert done.returncode == 0, done.stderr
        assert attr(m, "state") == "pivoted"
        with open(m.path("disk"), "r+b") as f:
            f.write(b"after")
        assert s.read_bytes()[:5] == b"after" and p.read_bytes()[:4] == b"head"
        assert m.stop() == 0


def test_sigterm_saves_the_map_and_a_remount_resumes(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    p, s = pair
    state = tmp_path / "map"
    spec = f"disk=mirror({p}, {s}, state={state}, rate=8M, chunk=256K)"
    with mounted(tmp_path / "mnt", [spec]) as m:
        wait_attr(m, "progress", lambda v: int(v) >= 25)
        assert m.stop(signal.SIGTERM) == 0
        assert "unmounted" in m.output()
    (start, copied_sectors), *_ = read_saved_map(str(state)).copied
    assert start == 0
    assert copied_sectors * 512 >= SIZE // 4
    with mounted(tmp_path / "mnt", [spec]) as m:
        assert int(attr(m, "copied")) >= copied_sectors * 512
        wait_attr(m, "state", lambda v: v == "synced")
    assert p.read_bytes() == s.read_bytes()


def test_kill_9_then_a_remount_resumes_and_ends_identical(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    p, s = pair
    state = tmp_path / "map"
    spec = f"disk=mirror({p}, {s}, state={state}, rate=8M, chunk=256K)"
    mnt = tmp_path / "mnt"
    blob = os.urandom(3 << 20)
    with mounted(mnt, [spec]) as m:
        wait_attr(m, "progress", lambda v: int(v) >= 20)
        fd = os.open(m.path("disk"), os.O_RDWR)
        try:
            os.pwrite(fd, blob, 1 << 20)  # into the copied part: both sides, dirty first
            os.pwrite(fd, blob, SIZE - (3 << 20))  # not copied yet: the primary only
            os.fsync(fd)
            saved = copied_in_map(state)  # as the fsync's checkpoint saved it
            wait_for(lambda: copied_in_map(state) > saved, 30, "a checkpoint after it", m)
            os.pwrite(fd, blob[::-1], 1 << 20)  # marked dirty, then killed before cleaned
        finally:
            os.close(fd)
        m.stop(signal.SIGKILL)
        assert is_mounted(mnt)
    assert 0 in read_saved_map(str(state)).copied
    with mounted(mnt, [spec]) as m:
        assert int(attr(m, "copied")) > 0, "the copy started again from zero"
        wait_attr(m, "state", lambda v: v == "synced")
        assert m.stop() == 0
    data = p.read_bytes()
    assert data == s.read_bytes()
    assert data[1 << 20 : 4 << 20] == blob[::-1]
    assert data[SIZE - (3 << 20) :] == blob


@pytest.mark.parametrize(
    ("secondary", "message"),
    [
        ("file({s}, ro=true)", "the secondary is read-only"),
        ("{small}", "they must be the same size"),
    ],
)
def test_refusals_are_one_line_and_change_nothing(
    tmp_path: Path, pair: tuple[Path, Path], secondary: str, message: str
) -> None:
    p, s = pair
    small = tmp_path / "small.img"
    small.write_bytes(b"\1" * 4096)
    state = tmp_path / "map"
    spec = f"disk=mirror({p}, {secondary.format(s=s, small=small)}, state={state})"
    out = cli("mount", str(tmp_path / "mnt"), "-d", spec)
    assert out.returncode == 1
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not state.exists() and small.read_bytes() == b"\1" * 4096
    assert s.read_bytes() == bytes(SIZE)
    assert not is_mounted(tmp_path / "mnt")


def test_the_primary_as_its_own_secondary_is_a_spec_error(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    p, _ = pair
    out = cli("mount", str(tmp_path / "mnt"), "-d", f"disk=mirror({p}, {p})")
    assert out.returncode == 2 and "the secondary is the primary itself" in out.stderr
    other = cli("mount", str(tmp_path / "mnt"), "-d", f"disk=mirror({p}, sparse({p}))")
    assert other.returncode == 2 and "the secondary is the primary itself" in other.stderr


def test_pivot_and_status_refuse_what_is_not_a_live_device(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    p, s = pair
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"\0" * 512)
    refused = cli("pivot", str(plain))
    assert refused.returncode != 0 and "not a device in a blockfuse mount" in refused.stderr
    assert os.listxattr(plain) == []
    with mounted(tmp_path / "mnt", [f"disk=mirror({p}, {s}, state={tmp_path / 'map'})"]) as m:
        refused = cli("pivot", str(m.mountpoint))
        assert refused.returncode != 0 and f"name the device: {m.mountpoint}/NAME" in refused.stderr
    refused = cli("status", str(tmp_path / "mnt"))
    assert refused.returncode != 0 and "is not a blockfuse mount" in refused.stderr
