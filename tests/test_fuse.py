"""The flat files through a real FUSE mount, driven with os calls, dd, cmp and getfattr."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .mounting import is_mounted, mounted


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    return path


def test_files_have_exact_sizes_and_modes(tmp_path: Path, image: Path) -> None:
    with mounted(
        tmp_path / "mnt", [f"disk={image}", "ram=mem(3M)", f"ro=file({image}, ro=true)"]
    ) as m:
        assert sorted(os.listdir(m.mountpoint)) == ["disk", "ram", "ro"]
        assert m.path("disk").stat().st_size == 16 << 20
        assert m.path("ram").stat().st_size == 3 << 20
        assert m.path("disk").stat().st_mode & 0o777 == 0o644
        assert m.path("ro").stat().st_mode & 0o777 == 0o444


def test_dd_through_the_mount_reaches_the_image(tmp_path: Path, image: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(os.urandom(4 << 20))
    with mounted(tmp_path / "mnt", [f"disk={image}"]) as m:
        subprocess.run(
            [
                "dd",
                f"if={data}",
                f"of={m.path('disk')}",
                "bs=1M",
                "seek=2",
                "conv=notrunc,fsync",
                "oflag=direct",
                "status=none",
            ],
            check=True,
            timeout=30,
        )
        subprocess.run(["cmp", "-n", str(16 << 20), str(m.path("disk")), str(image)], check=True)
    assert image.read_bytes()[2 << 20 : 6 << 20] == data.read_bytes()


def test_unaligned_random_writes_match_a_reference(tmp_path: Path, image: Path) -> None:
    reference = bytearray(16 << 20)
    rng = random.Random(1234)
    with mounted(tmp_path / "mnt", [f"disk={image}"]) as m:
        fd = os.open(m.path("disk"), os.O_RDWR)
        try:
            for _ in range(300):
                offset = rng.randrange(0, (16 << 20) - 1)
                length = min(rng.randrange(1, 70000), (16 << 20) - offset)
                blob = rng.randbytes(length)
                assert os.pwrite(fd, blob, offset) == length
                reference[offset : offset + length] = blob
            for _ in range(100):
                offset = rng.randrange(0, 16 << 20)
                length = rng.randrange(1, 200000)
                assert os.pread(fd, length, offset) == reference[offset : offset + length]
            os.fsync(fd)
        finally:
            os.close(fd)
    assert image.read_bytes() == reference


def test_writes_past_the_end(tmp_path: Path) -> None:
    with mounted(tmp_path / "mnt", ["ram=mem(1M)"]) as m:
        fd = os.open(m.path("ram"), os.O_RDWR)
        try:
            assert os.pwrite(fd, b"x" * 1000, (1 << 20) - 100) == 100
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"x", 1 << 20)
            assert info.value.errno == errno.ENOSPC
            assert os.pread(fd, 10, 1 << 20) == b""
        finally:
            os.close(fd)


def test_read_only_refuses_writes(tmp_path: Path, image: Path) -> None:
    with mounted(tmp_path / "mnt", [f"ro=file({image}, ro=true)"]) as m:
        with pytest.raises(OSError) as info:
            os.open(m.path("ro"), os.O_RDWR)
        assert info.value.errno == errno.EROFS
        assert m.path("ro").read_bytes() == bytes(16 << 20)


def test_read_only_mount_flag(tmp_path: Path, image: Path) -> None:
    with mounted(tmp_path / "mnt", [f"disk={image}"], ["--read-only"]) as m:
        assert m.path("disk").stat().st_mode & 0o777 == 0o444
        with pytest.raises(OSError) as info:
            os.open(m.path("disk"), os.O_WRONLY)
        assert info.value.errno == errno.EROFS


def test_truncate_of_a_fixed_size_device_is_refused(tmp_path: Path, image: Path) -> None:
    with mounted(tmp_path / "mnt", [f"disk={image}"]) as m:
        with pytest.raises(OSError) as info:
            os.truncate(m.path("disk"), 1 << 20)
        assert info.value.errno == errno.EPERM
        os.truncate(m.path("disk"), 16 << 20)  # the same size is fine
        assert m.path("disk").stat().st_size == 16 << 20


def test_xattrs_give_kind_and_spec(tmp_path: Path, image: Path) -> None:
    with mounted(tmp_path / "mnt", [f"disk={image}", "ram=safe(mem(1M))"]) as m:
        out = subprocess.run(
            ["getfattr", "-d", str(m.path("ram"))], capture_output=True, text=True, check=True
        ).stdout
        assert 'user.blockfuse.kind="memory"' in out
        assert 'user.blockfuse.spec="safe(mem(1M))"' in out
        assert os.getxattr(m.path("disk"), "user.blockfuse.kind") == b"file"
        assert os.getxattr(m.path("disk"), "user.blockfuse.size") == str(16 << 20).encode()


def test_sigterm_unmounts_cleanly(tmp_path: Path, image: Path) -> None:
    with mounted(tmp_path / "mnt", [f"disk={image}"]) as m:
        with open(m.path("disk"), "r+b") as f:
            f.write(b"hello")
        assert m.stop(signal.SIGTERM) == 0
        assert not is_mounted(m.mountpoint)
        assert "unmounted" in m.output()
    assert image.read_bytes()[:5] == b"hello"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])  # Ctrl-C; a closed terminal
def test_sigint_and_sighup_unmount_cleanly(tmp_path: Path, image: Path, sig: int) -> None:
    with mounted(tmp_path / "mnt", [f"disk={image}"]) as m:
        assert m.stop(sig) == 0
        assert not is_mounted(m.mountpoint)


def test_umount_command_ends_the_mount(tmp_path: Path, image: Path) -> None:
    with mounted(tmp_path / "mnt", [f"disk={image}"]) as m:
        subprocess.run([*blockfuse(), "umount", str(m.mountpoint)], check=True, timeout=20)
        assert m.proc.poll() == 0, "umount returned before blockfuse closed its devices"
        assert not is_mounted(m.mountpoint)


def test_stale_mount_is_cleared(tmp_path: Path, image: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(mnt, [f"disk={image}"]) as m:
        m.stop(signal.SIGKILL)
        assert is_mounted(mnt)
        with pytest.raises(OSError) as info:
            os.listdir(mnt)
        assert info.value.errno == errno.ENOTCONN
    # the fixture cleared it; make another stale one and let blockfuse clear it
    with mounted(mnt, [f"disk={image}"]) as m:
        m.stop(signal.SIGKILL)
        with mounted(mnt, [f"disk={image}"]) as again:
            assert again.path("disk").stat().st_size == 16 << 20
            assert "stale mount" in again.output()


def test_live_mount_is_refused(tmp_path: Path, image: Path) -> None:
    with mounted(tmp_path / "mnt", [f"disk={image}"]) as m:
        out = subprocess.run(
            [*blockfuse(), "mount", str(m.mountpoint), "-d", f"disk={image}"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert out.returncode == 1
        assert f"blockfuse umount {m.mountpoint}" in out.stderr


def blockfuse() -> list[str]:
    from .mounting import blockfuse_command

    return blockfuse_command()


def test_concurrent_writers_to_one_sector_through_fuse(tmp_path: Path) -> None:
    """Threads write interleaved single bytes of the same sectors; none is lost.

    The kernel serialises direct-I/O writes to one file (pyfuse3 cannot ask for
    FOPEN_PARALLEL_DIRECT_WRITES), so the range lock itself is proven in process by
    tests/test_bridge.py; this checks the whole path with a real mount.
    """
    from concurrent.futures import ThreadPoolExecutor

    with mounted(tmp_path / "mnt", ["ram=mem(1M)"]) as m:
        fd = os.open(m.path("ram"), os.O_RDWR)
        try:
            offsets = list(range(0, 4096))
            random.Random(3).shuffle(offsets)

            def put(offset: int) -> None:
                os.pwrite(fd, bytes([offset % 255 + 1]), offset)

            with ThreadPoolExecutor(32) as pool:
                list(pool.map(put, offsets, timeout=60))
            data = os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
    assert data == bytes(o % 255 + 1 for o in range(4096))


def test_device_errors_become_errno_and_the_mount_lives_on(tmp_path: Path, image: Path) -> None:
    with mounted(tmp_path / "mnt", [f"disk={image}"]) as m:
        fd = os.open(m.path("disk"), os.O_RDWR)
        try:
            os.truncate(image, 4096)  # the image shrinks behind the device's back
            with pytest.raises(OSError) as info:
                os.pread(fd, 4096, 8 << 20)
            assert info.value.errno == errno.EIO
            assert os.pread(fd, 4096, 0) == bytes(4096)
        finally:
            os.close(fd)
        assert m.proc.poll() is None


def test_bare_mount_shows_the_default_device(tmp_path: Path) -> None:
    with mounted(tmp_path / "mnt", cwd=tmp_path) as m:
        assert os.listdir(m.mountpoint) == ["disk"]
        assert m.path("disk").stat().st_size == 1 << 30
        backing = tmp_path / "blockfuse-disk.img"
        assert backing.stat().st_size == 1 << 30
        assert backing.stat().st_blocks == 0, "the default image is created sparse"


def test_a_mountpoint_with_a_space_and_non_ascii_letters(tmp_path: Path, image: Path) -> None:
    mnt = tmp_path / "mnt ü"
    with mounted(mnt, [f"disk={image}"]) as m:
        status = subprocess.run(
            [*blockfuse(), "status", str(mnt)], capture_output=True, text=True, timeout=20
        )
        assert status.returncode == 0 and status.stdout.startswith("disk: file")
        m.stop(signal.SIGKILL)
        with mounted(mnt, [f"disk={image}"]) as again:
            assert "stale mount" in again.output()


def test_a_stopped_blockfuse_hangs_no_command(tmp_path: Path, image: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(mnt, [f"disk={image}"]) as m:
        time.sleep(1.5)  # past the attribute timeout: a stat now asks the process
        os.kill(m.proc.pid, signal.SIGSTOP)
        try:
            for args in (["status", str(mnt)], ["mount", str(mnt), "-d", f"disk={image}"]):
                out = subprocess.run(
                    [*blockfuse(), *args], capture_output=True, text=True, timeout=20
                )
                assert out.returncode == 1 and "does not answer" in out.stderr, out.stderr
            out = subprocess.run(
                [*blockfuse(), "umount", str(mnt)], capture_output=True, text=True, timeout=20
            )
            assert out.returncode == 0, out.stderr
        finally:
            os.kill(m.proc.pid, signal.SIGCONT)
        assert m.proc.wait(timeout=20) == 0
