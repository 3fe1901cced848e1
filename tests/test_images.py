"""Images of other formats (qcow2, VMDK, VHDX, QED, VDI) are refused unless the spec says
``format=raw`` (issue 17): made by qemu-img, as users make them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from blockfuse.cli import main
from blockfuse.devices.file import open_file
from blockfuse.devices.images import image_format
from blockfuse.devices.sparse import open_sparse
from blockfuse.spec import SpecError, compile_spec

from .conftest import require_tool
from .timing import time_limit

limit = time_limit(60)

FORMATS = ["qcow2", "vmdk", "vhdx", "qed", "vdi"]
NAMES = {"qcow2": "qcow2", "vmdk": "VMDK", "vhdx": "VHDX", "qed": "QED", "vdi": "VDI"}


def qemu_image(tmp_path: Path, fmt: str, size: str = "64M") -> Path:
    """A new image of ``fmt`` made by ``qemu-img create``, padded to whole sectors (so
    that only its format can be what is refused)."""
    path = tmp_path / f"disk.{fmt}"
    qemu_img = require_tool("qemu-img", "qemu-utils")
    subprocess.run([qemu_img, "create", "-q", "-f", fmt, str(path), size], check=True, timeout=60)
    length = path.stat().st_size
    os.truncate(path, -(-length // 512) * 512)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_is_recognised_by_its_magic(tmp_path: Path, fmt: str) -> None:
    path = qemu_image(tmp_path, fmt)
    assert image_format(path.read_bytes()[:512]) == fmt


def test_raw_data_is_no_format() -> None:
    assert image_format(bytes(512)) is None
    assert image_format(b"QFI" + bytes(509)) is None
    assert image_format(b"conectiy" + bytes(504)) is None


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("spec", ["{}", "file({})", "sparse({})", "safe({})"])
def test_a_formatted_image_given_as_a_path_is_refused_with_the_way_out(
    tmp_path: Path, fmt: str, spec: str
) -> None:
    path = qemu_image(tmp_path, fmt)
    with pytest.raises(SpecError) as info:
        compile_spec(spec.format(path))
    message = str(info.value)
    assert f"{path} is a {NAMES[fmt]} image, not a raw disk" in message
    sock = tmp_path / "disk.sock"
    assert f"qemu-nbd -t -f {fmt} -k {sock} {path}" in message
    assert f"nbd+unix:///?socket={sock}" in message
    assert "qemu-img convert -O raw" in message and f"file({path}, format=raw)" in message
    assert "\n" not in message


def test_a_formatted_secondary_is_refused(tmp_path: Path) -> None:
    primary = tmp_path / "p.img"
    primary.write_bytes(b"")
    os.truncate(primary, 64 << 20)
    secondary = qemu_image(tmp_path, "vhdx")
    with pytest.raises(SpecError, match="is a VHDX image"):
        compile_spec(f"mirror({primary}, sparse({secondary}))")


@pytest.mark.parametrize("spec", ["file({}, format=raw)", "sparse({}, format=raw)"])
def test_format_raw_takes_the_bytes_as_they_are(tmp_path: Path, spec: str) -> None:
    path = qemu_image(tmp_path, "vmdk")
    assert compile_spec(spec.format(path)).kind in ("file", "sparse")


@pytest.mark.parametrize("spec", ["file({}, format=qcow2)", "sparse({}, format=vmdk)"])
def test_only_raw_is_a_format(tmp_path: Path, spec: str) -> None:
    path = tmp_path / "x.img"
    path.write_bytes(b"")
    os.truncate(path, 1 << 20)
    with pytest.raises(SpecError, match="reads raw images only"):
        compile_spec(spec.format(path))


async def test_opening_checks_again(tmp_path: Path) -> None:
    """An image that became a qcow2 after its spec was checked is refused at open too."""
    path = qemu_image(tmp_path, "qcow2")
    with pytest.raises(ValueError, match="is a qcow2 image"):
        open_file(str(path))
    with pytest.raises(ValueError, match="is a qcow2 image"):
        open_sparse(str(path))
    device = open_file(str(path), format="raw")
    try:
        assert (await device.get_info()).size_bytes == path.stat().st_size
    finally:
        await device.aclose()


def test_mount_refuses_a_qcow2_with_exit_2_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = qemu_image(tmp_path, "qcow2")
    monkeypatch.chdir(tmp_path)
    status = main(["mount", "mnt", "-d", f"disk={path.name}"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "disk.qcow2 is a qcow2 image, not a raw disk" in err
    assert len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == [path.name]


def test_a_fifo_is_refused_without_reading_it(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for spec in (f"sparse({fifo})", f"file({fifo})", str(fifo)):
        with pytest.raises(SpecError, match="is not a regular file or block device"):
            compile_spec(spec)
