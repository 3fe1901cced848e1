"""Sparse devices through a real mount: huge sizes, truncate, the default device, ext4.

Slow end-to-end cases.  Every subprocess has a timeout; loop devices and mounts are
undone in ``finally`` blocks, also when a check fails.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from blockfuse.block import BlockDevice, Capability
from blockfuse.devices.sparse import open_sparse
from blockfuse.opening import OpenContext
from blockfuse.spec import SpecError, compile_spec
from blockfuse.testing import check_block_device

from .conftest import require_tool
from .mounting import MountProcess, fs_mounted, loop_device, mounted, run

pytestmark = pytest.mark.e2e

GiB = 1 << 30
TiB = 1 << 40


def allocated(path: Path) -> int:
    """Bytes the filesystem holds for ``path`` (what `du` shows)."""
    return os.stat(path).st_blocks * 512


@contextmanager
def watchdog(m: MountProcess, seconds: float) -> Iterator[None]:
    """Bound a block of plain os calls on the mount: past ``seconds`` the mount process is
    killed, so hung I/O fails (ENOTCONN) instead of hanging the suite."""
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        m.proc.kill()

    timer = threading.Timer(seconds, expire)
    timer.start()
    try:
        yield
    except Exception as exc:
        if fired.is_set():
            raise AssertionError(f"I/O on the mount took over {seconds}s") from exc
        raise
    finally:
        timer.cancel()
    assert not fired.is_set(), f"I/O on the mount took over {seconds}s"


def test_one_tebibyte_device(tmp_path: Path) -> None:
    image = tmp_path / "huge.img"
    blob = os.urandom(1 << 20)
    with mounted(tmp_path / "mnt", [f"disk=sparse({image}, size=1T)"]) as m, watchdog(m, 60):
        disk = m.path("disk")
        assert disk.stat().st_size == TiB
        fd = os.open(disk, os.O_RDWR)
        try:
            assert os.pread(fd, 1 << 20, TiB - (1 << 20)) == bytes(1 << 20)
            assert os.pread(fd, 100, TiB - 50) == bytes(50), "a read is cut at the end"
            assert os.pwrite(fd, blob, 900 * GiB) == len(blob)
            os.fsync(fd)
            assert os.pread(fd, len(blob), 900 * GiB) == blob
        finally:
            os.close(fd)
        assert int(run("du", "-k", str(image), timeout=10).split()[0]) <= 2048, "du: tiny"
        assert int(os.getxattr(disk, "user.blockfuse.allocated")) < 2 << 20
        assert disk.stat().st_blocks * 512 < 2 << 20, "du on the flat file: what the image holds"
    assert image.stat().st_size == TiB
    assert allocated(image) < 2 << 20
    with open(image, "rb") as f:
        f.seek(900 * GiB)
        assert f.read(len(blob)) == blob


def test_truncate_grows_and_shrinks_through_the_mount(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with mounted(tmp_path / "mnt", [f"disk=sparse({image}, size=64M)"]) as m, watchdog(m, 60):
        disk = m.path("disk")
        with open(disk, "r+b") as f:
            f.seek((64 << 20) - 5)
            f.write(b"tail!")
        run("truncate", "-s", "1G", str(disk), timeout=20)
        assert disk.stat().st_size == GiB
        assert image.stat().st_size == GiB
        with open(disk, "r+b") as f:
            f.seek((64 << 20) - 5)
            assert f.read(5) == b"tail!"
            assert f.read(1 << 20) == bytes(1 << 20), "grown space reads as zeroes"
            f.seek(GiB - 4)
            f.write(b"end!")
        run("truncate", "-s", "32M", str(disk), timeout=20)
        assert disk.stat().st_size == 32 << 20
        run("truncate", "-s", "64M", str(disk), timeout=20)
        with open(disk, "rb") as f:
            f.seek((64 << 20) - 5)
            assert f.read(5) == bytes(5), "shrinking dropped the data past the end"
        with pytest.raises(OSError) as info:
            os.truncate(disk, (64 << 20) + 100)
        assert info.value.errno == errno.EINVAL
    assert image.stat().st_size == 64 << 20


def test_bare_mount_serves_a_sparse_default_image(tmp_path: Path) -> None:
    with mounted(tmp_path / "mnt", cwd=tmp_path) as m, watchdog(m, 60):
        assert m.path("disk").stat().st_size == GiB
        assert os.getxattr(m.path("disk"), "user.blockfuse.kind") == b"sparse"
        run("truncate", "-s", "2G", str(m.path("disk")), timeout=20)
    image = tmp_path / "blockfuse-disk.img"
    assert image.stat().st_size == 2 * GiB and allocated(image) == 0
    with mounted(tmp_path / "mnt", cwd=tmp_path) as m, watchdog(m, 60):
        assert m.path("disk").stat().st_size == 2 * GiB, "the resized image keeps its size"


def write_files(root: Path) -> dict[str, str]:
    digests = {}
    for i in range(20):
        data = os.urandom((i + 1) * 100_000)
        (root / f"file{i}").write_bytes(data)
        digests[f"file{i}"] = hashlib.sha256(data).hexdigest()
    os.sync()
    return digests


def test_ext4_on_a_sixteen_gib_sparse_device(tmp_path: Path) -> None:
    mkfs = require_tool("mkfs.ext4", "e2fsprogs")
    e2fsck = require_tool("e2fsck", "e2fsprogs")
    image = tmp_path / "ext4.img"
    with (
        mounted(tmp_path / "mnt", [f"disk=sparse({image}, size=16G)"]) as m,
        watchdog(m, 300),
        loop_device(m.path("disk")) as dev,
    ):
        run(mkfs, "-q", "-F", dev, timeout=120)
        with fs_mounted(dev, tmp_path / "fs") as fs:
            digests = write_files(fs)
        result = subprocess.run([e2fsck, "-fn", dev], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        with fs_mounted(dev, tmp_path / "fs") as fs:
            for name, digest in digests.items():
                assert hashlib.sha256((fs / name).read_bytes()).hexdigest() == digest
    assert image.stat().st_size == 16 * GiB
    assert allocated(image) < 128 << 20, f"backing file holds {allocated(image)} bytes"
    # The backing file itself, with no mount or cache in between, holds the filesystem.
    result = subprocess.run(
        [e2fsck, "-fn", str(image)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    debugfs = require_tool("debugfs", "e2fsprogs")
    out = subprocess.run(
        [debugfs, "-R", "cat /file7", str(image)], capture_output=True, timeout=60, check=True
    ).stdout
    assert hashlib.sha256(out).hexdigest() == digests["file7"]


async def test_sparse_over_a_block_device(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A block device cannot grow: its size is the limit, and it offers no resize."""
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(8 << 20)
    with loop_device(backing) as dev:
        with pytest.raises(SpecError, match="cannot hold size="):
            compile_spec(f"sparse({dev}, size=16M)")
        prefix = await compile_spec(f"sparse({dev}, size=4M)").open(OpenContext(nursery))
        assert (await prefix.get_info()).size_bytes == 4 << 20
        await prefix.aclose()

        async def make() -> BlockDevice:
            return open_sparse(dev)

        device = await make()
        assert (await device.get_info()).size_bytes == 8 << 20
        assert Capability.RESIZE not in device.capabilities
        assert "allocated" not in device.status()  # a block device holds all of itself
        await device.aclose()
        with trio.fail_after(60):
            await check_block_device(make)
