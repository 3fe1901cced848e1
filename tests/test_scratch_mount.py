"""Scratch directories through a real mount: cp/cmp, rm and reuse, ENOSPC, bad names."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from . import timing
from .mounting import MountProcess, mounted

MiB = 1 << 20


time_limit = timing.time_limit(60)


def scratch(tmp_path: Path, spec: str = "mem(4M)", *extra: str) -> mounted:  # type: ignore[valid-type]
    return mounted(tmp_path / "mnt", extra=["--scratch", f"tmp={spec}", *extra])


def run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, timeout=30)


def errno_of(call, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno or 0


def statvfs_free(m: MountProcess) -> int:
    st = os.statvfs(m.path("tmp"))
    return st.f_bfree * st.f_frsize


def wait_for_free(m: MountProcess, expected: int) -> None:
    """The space of a removed file returns when the kernel forgets it, just after rm."""
    deadline = time.monotonic() + 5
    while statvfs_free(m) != expected:
        assert time.monotonic() < deadline, f"free {statvfs_free(m)}, expected {expected}"
        time.sleep(0.01)


def test_cp_in_and_cmp_back(tmp_path: Path) -> None:
    sources = []
    for i, size in enumerate([0, 1, 511, 4096, MiB + 7, 2 * MiB]):
        src = tmp_path / f"src{i}"
        src.write_bytes(os.urandom(size))
        sources.append(src)
    with scratch(tmp_path, "mem(8M)") as m:
        assert os.listdir(m.mountpoint) == ["tmp"]
        for src in sources:
            run("cp", src, m.path("tmp"))
        assert sorted(os.listdir(m.path("tmp"))) == sorted(s.name for s in sources)
        for src in sources:
            run("cmp", src, m.path("tmp") / src.name)
            assert (m.path("tmp") / src.name).stat().st_size == src.stat().st_size
        out = subprocess.run(
            ["ls", "-l", str(m.path("tmp"))], capture_output=True, text=True, timeout=30
        ).stdout
        assert f" {MiB + 7} " in out
        run("cp", sources[2], m.path("tmp") / sources[5].name)  # O_TRUNC over a bigger file
        run("cmp", sources[2], m.path("tmp") / sources[5].name)
        assert statvfs_free(m) == 8 * MiB - 6 * MiB  # 511 B, 4 KiB, 1 MiB+7 B, 511 B


def test_rm_frees_and_the_space_is_reused(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(3 * MiB))
    with scratch(tmp_path) as m:
        assert statvfs_free(m) == 4 * MiB
        for name in ("one", "two", "three"):
            run("cp", blob, m.path("tmp") / name)
            assert statvfs_free(m) == MiB
            run("cmp", blob, m.path("tmp") / name)
            run("rm", m.path("tmp") / name)
            wait_for_free(m, 4 * MiB)
        assert os.listdir(m.path("tmp")) == []


def test_full_device_fails_with_enospc_and_harms_no_other_file(tmp_path: Path) -> None:
    a, b = os.urandom(2 * MiB + 100), os.urandom(1000)
    with scratch(tmp_path) as m:
        (m.path("tmp") / "a").write_bytes(a)
        (m.path("tmp") / "b").write_bytes(b)
        fd = os.open(m.path("tmp") / "b", os.O_WRONLY | os.O_APPEND)
        written = 0
        try:
            with pytest.raises(OSError) as info:
                while written < 4 * MiB:  # short writes until the last unit is full
                    written += os.write(fd, b"z" * MiB)
            assert info.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert written <= MiB - 1000
        assert (m.path("tmp") / "a").read_bytes() == a
        assert (m.path("tmp") / "b").read_bytes() == b + b"z" * written
        assert errno_of((m.path("tmp") / "c").write_bytes, b"x") == errno.ENOSPC
        assert (m.path("tmp") / "a").read_bytes() == a
        assert (m.path("tmp") / "c").stat().st_size == 0


def test_appends_overwrites_gaps_and_truncate(tmp_path: Path) -> None:
    with scratch(tmp_path) as m:
        path = m.path("tmp") / "log"
        expected = b""
        with open(path, "ab") as f:
            for i in range(200):
                line = f"line {i}\n".encode() * (i % 7 + 1)
                f.write(line)
                f.flush()
                expected += line
        subprocess.run(f"echo tail >> {path}", shell=True, check=True, timeout=30)
        expected += b"tail\n"
        assert path.read_bytes() == expected
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"XYZ", 5)
            os.pwrite(fd, b"end", len(expected) + 5000)
        finally:
            os.close(fd)
        expected = expected[:5] + b"XYZ" + expected[8:] + bytes(5000) + b"end"
        assert path.read_bytes() == expected
        os.truncate(path, 10)
        assert path.read_bytes() == expected[:10]
        os.truncate(path, 3000)
        assert path.read_bytes() == expected[:10] + bytes(2990)


def test_random_writes_truncates_and_reads_match_a_model(tmp_path: Path) -> None:
    rng = random.Random(99)
    model = bytearray()
    with scratch(tmp_path, "mem(8M)", "--scratch-unit", "64K") as m:
        fd = os.open(m.path("tmp") / "f", os.O_RDWR | os.O_CREAT)
        try:
            for _ in range(300):
                offset = rng.randrange(0, 3 * MiB)
                if rng.random() < 0.1:
                    os.ftruncate(fd, offset)
                    model = model[:offset] + bytes(max(0, offset - len(model)))
                    continue
                blob = rng.randbytes(rng.randrange(1, 70000))
                assert os.pwrite(fd, blob, offset) == len(blob)
                model.extend(bytes(max(0, offset + len(blob) - len(model))))
                model[offset : offset + len(blob)] = blob
            assert os.fstat(fd).st_size == len(model)
            for _ in range(100):
                offset, length = rng.randrange(0, len(model) + 10), rng.randrange(1, 200000)
                assert os.pread(fd, length, offset) == model[offset : offset + length]
        finally:
            os.close(fd)


def test_parallel_writers_to_different_files(tmp_path: Path) -> None:
    blobs = {f"f{i}": os.urandom(MiB + 4096 * i + i) for i in range(6)}
    with scratch(tmp_path, "mem(16M)", "--scratch-unit", "64K") as m:

        def write(name: str) -> None:
            with open(m.path("tmp") / name, "wb") as f:
                data = memoryview(blobs[name])
                for start in range(0, len(data), 10000):
                    f.write(data[start : start + 10000])
                    f.flush()

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(write, blobs))
        for name, data in blobs.items():
            assert (m.path("tmp") / name).read_bytes() == data


def test_bad_names_and_directories_get_the_usual_errno(tmp_path: Path) -> None:
    with scratch(tmp_path) as m:
        d = m.path("tmp")
        (d / ("n" * 255)).write_bytes(b"ok")
        assert errno_of((d / ("n" * 256)).write_bytes, b"x") == errno.ENAMETOOLONG
        assert errno_of(os.mkdir, d / "sub") == errno.EPERM
        assert errno_of(os.mkdir, d / ("n" * 255)) == errno.EEXIST
        assert errno_of(os.symlink, "x", d / "link") == errno.EPERM
        assert errno_of(os.link, d / ("n" * 255), d / "hard") == errno.EPERM
        assert errno_of((d / "missing" / "x").write_bytes, b"x") == errno.ENOENT
        assert errno_of((d / ("n" * 255) / "x").write_bytes, b"x") == errno.ENOTDIR
        assert errno_of(os.rmdir, d / ("n" * 255)) == errno.ENOTDIR
        assert errno_of(os.rename, d / ("n" * 255), m.mountpoint / "moved") == errno.EXDEV
        assert errno_of(os.rename, d / "missing", d / "x") == errno.ENOENT


def test_rename_over_an_open_file_keeps_it_readable_until_closed(tmp_path: Path) -> None:
    with scratch(tmp_path) as m:
        d = m.path("tmp")
        (d / "old").write_bytes(b"o" * MiB)
        (d / "new").write_bytes(b"n" * 10)
        fd = os.open(d / "old", os.O_RDONLY)
        try:
            os.rename(d / "new", d / "old")
            assert (d / "old").read_bytes() == b"n" * 10
            assert os.pread(fd, 4, 0) == b"oooo"
            assert statvfs_free(m) == 2 * MiB
        finally:
            os.close(fd)
        assert sorted(os.listdir(d)) == ["old"]
        assert_eventually(lambda: statvfs_free(m) == 3 * MiB)


def test_unlinked_open_file_lives_until_closed(tmp_path: Path) -> None:
    with scratch(tmp_path) as m:
        path = m.path("tmp") / "f"
        with open(path, "w+b") as f:
            f.write(b"data" * 1000)
            f.flush()
            os.unlink(path)
            f.seek(0)
            assert f.read() == b"data" * 1000
            assert statvfs_free(m) == 3 * MiB
        assert_eventually(lambda: statvfs_free(m) == 4 * MiB)


def test_statfs_shows_the_scratch_capacity_and_free_space(tmp_path: Path) -> None:
    with scratch(tmp_path, "mem(4M)", "--scratch-unit", "64K") as m:
        (m.path("tmp") / "f").write_bytes(bytes(100 * 1024))
        st = os.statvfs(m.path("tmp"))
        assert st.f_blocks * st.f_frsize == 4 * MiB
        assert st.f_bfree * st.f_frsize == 4 * MiB - 128 * 1024
        out = subprocess.run(
            ["df", "-B1", str(m.path("tmp"))], capture_output=True, text=True, timeout=30
        ).stdout
        assert str(4 * MiB) in out
        for i in range(3):
            (m.path("tmp") / f"g{i}").write_bytes(b"x")
        st = os.statvfs(m.path("tmp"))  # df -i: root, tmp/ and 4 files used; 64 - 5 units free
        assert (st.f_files - st.f_ffree, st.f_ffree) == (6, 59)


def test_everything_is_gone_after_unmount(tmp_path: Path) -> None:
    image = tmp_path / "scratch.img"
    image.write_bytes(bytes(4 * MiB))
    with scratch(tmp_path, str(image)) as m:
        (m.path("tmp") / "f").write_bytes(b"secret")
    with scratch(tmp_path, str(image)) as m:
        assert os.listdir(m.path("tmp")) == []
        assert statvfs_free(m) == 4 * MiB


def test_help_warns_that_scratch_files_are_temporary() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "blockfuse.cli", "mount", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "gone after unmount" in " ".join(out.split())


def assert_eventually(condition, timeout: float = 5) -> None:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.02)


def test_bad_scratch_options_are_refused_before_mounting(tmp_path: Path) -> None:
    cases = [
        (["-d", "x=mem(1M)", "--scratch", "x=mem(4M)"], 2, "names both a device and a scratch"),
        (["--scratch", "tmp=mem(512K)"], 1, "smaller than one 1 MiB unit"),
        (["--scratch", "tmp=mem(4M)", "--scratch-unit", "1000"], 2, "not a positive multiple"),
        (["--scratch", "tmp=mem(4M)", "--scratch-unit", "1X"], 2, "bad size '1X'"),
    ]
    for args, status, message in cases:
        out = subprocess.run(
            [sys.executable, "-m", "blockfuse.cli", "mount", str(tmp_path / "mnt"), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (out.returncode, message in out.stderr) == (status, True), out.stderr
        assert not (tmp_path / "mnt").exists(), "a refused mount created its mountpoint"


def test_df_on_a_scratch_dir_shows_its_device(tmp_path: Path) -> None:
    with mounted(tmp_path / "mnt", ["r=mem(1M)"], ["--scratch", "tmp=mem(4M)"]) as m:
        st = os.statvfs(m.path("tmp"))
        assert st.f_blocks * st.f_frsize == 4 * MiB
        assert st.f_bfree * st.f_frsize == 4 * MiB


def test_status_describes_a_scratch_directory(tmp_path: Path) -> None:
    from blockfuse.cli.monitor import status_report

    with scratch(tmp_path, "mem(8M)") as m:
        (m.path("tmp") / "a").write_bytes(b"x" * 3000)
        assert status_report(str(m.mountpoint)) == "tmp/: scratch directory, 1 file, 2.9 KiB"
