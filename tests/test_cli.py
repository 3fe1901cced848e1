"""The blockfuse command's argument handling: bad input is exit 2 and changes nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from blockfuse.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = main(list(argv))
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("disk=mem(1X)", "bad device spec 'mem(1X)': bad size '1X'"),
        ("disk=nope(1)", "unknown device kind 'nope'"),
        ("disk=./missing.img", "no such file: ./missing.img"),
        ("disk", "expected NAME=SPEC"),
        ("a/b=mem(1M)", "must be a file name"),
        ("disk=mem(1M", "expected ',' or ')'"),
    ],
)
def test_bad_specs_exit_2_and_create_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    status, err = run(capsys, "mount", "mnt", "--device", device)
    assert status == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_one_bad_device_among_good_ones_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    status, err = run(capsys, "mount", "mnt", "-d", "a=mem(1M)", "-d", "b=mem(2Q)")
    assert status == 2 and "bad size '2Q'" in err
    assert os.listdir(tmp_path) == []


def test_duplicate_names_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    status, err = run(capsys, "mount", "mnt", "-d", "a=mem(1M)", "-d", "a=mem(1M)")
    assert status == 2 and "two devices are named 'a'" in err


def test_umount_of_a_plain_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, err = run(capsys, "umount", str(tmp_path))
    assert status == 1 and "is not mounted" in err


def test_mountpoint_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    status, err = run(capsys, "mount", str(target), "-d", "a=mem(1M)")
    assert status == 1 and "is not a directory" in err


@pytest.mark.parametrize(
    ("setup", "device", "message"),
    [
        ("odd", "disk=odd.img", "odd.img is 1000 bytes, not a whole number of 512-byte sectors"),
        ("", "disk=/dev/null", "/dev/null is not a regular file or block device"),
        ("", "disk=file(.)", ". is a directory"),
    ],
)
def test_unusable_files_exit_2_before_the_mountpoint_exists(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    setup: str,
    device: str,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    if setup:
        (tmp_path / "odd.img").write_bytes(b"x" * 1000)
    status, err = run(capsys, "mount", "mnt", "--device", device)
    assert status == 2 and message in err
    assert not (tmp_path / "mnt").exists()


def test_mountpoint_in_a_missing_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = run(capsys, "mount", str(tmp_path / "no" / "mnt"), "-d", "a=mem(1M)")
    assert status == 1
    assert f"cannot create {tmp_path / 'no' / 'mnt'}: {tmp_path / 'no'} does not exist" in err
    assert len(err.strip().splitlines()) == 1


def test_umount_leaves_other_filesystems_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "tmpfs"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(target)], check=True, timeout=10)
    try:
        status, err = run(capsys, "umount", str(target))
        assert status == 1 and "is a mount of type tmpfs, not blockfuse's" in err
        assert os.path.ismount(target)
    finally:
        subprocess.run(["umount", str(target)], check=False, timeout=10)


def sized_file(path: Path, size: int, data: bytes = b"") -> str:
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    return str(path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["-d", "a=sparse(new.img, size=1G)", "-d", "b=nbd://127.0.0.1:1/x"], "cannot connect"),
        (
            ["-d", "disk=mirror(p.img, sparse(new.img, size=32M), state=m.state)"],
            "must be the same size",
        ),
        (
            ["-d", "a=mirror(p.img, sparse(new.img), state=m.state)", "--scratch", "t=mem(9K)"],
            "smaller than one 1 MiB unit",
        ),
    ],
)
def test_a_mount_that_fails_leaves_no_file_it_created(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    options: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    sized_file(tmp_path / "p.img", 64 << 20, os.urandom(1 << 20))
    status, err = run(capsys, "mount", "mnt", *options)
    assert status == 1 and message in err
    assert sorted(os.listdir(tmp_path)) == ["p.img"]


def test_a_mount_that_fails_writes_nothing_to_an_existing_secondary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    sized_file(tmp_path / "p.img", 8 << 20, os.urandom(8 << 20))
    sized_file(tmp_path / "s.img", 8 << 20)
    before = (tmp_path / "s.img").read_bytes()
    options = ["-d", "a=mirror(p.img, s.img)", "-d", "b=nbd://127.0.0.1:1/x"]
    status, err = run(capsys, "mount", "mnt", *options)
    assert status == 1 and "cannot connect" in err
    assert (tmp_path / "s.img").read_bytes() == before  # the copier never started


def test_one_image_cannot_be_written_by_two_devices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    sized_file(tmp_path / "x.img", 1 << 20)
    status, err = run(capsys, "mount", "mnt", "-d", "a=sparse(x.img)", "-d", "b=x.img")
    assert status == 1 and "x.img is already open for writing by another blockfuse" in err
    assert sorted(os.listdir(tmp_path)) == ["x.img"]
