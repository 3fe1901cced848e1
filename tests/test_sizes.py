"""Size 0 is refused the same way everywhere; a mirror onto its own image is a spec error;
a resized device shows the spec it has now (issue 17)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockfuse.block import BlockDevice
from blockfuse.cli import main
from blockfuse.devices.file import open_file
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.safe import SafeDevice
from blockfuse.devices.sparse import open_sparse
from blockfuse.errors import Unsafe
from blockfuse.fuse.flatfile import FlatFile
from blockfuse.spec import SpecError, compile_spec, resized_spec


def empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.img"
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("spec", ["{}", "file({})", "file({}, ro=true)", "sparse({})"])
def test_an_empty_image_is_refused_in_one_line(tmp_path: Path, spec: str) -> None:
    path = empty(tmp_path)
    with pytest.raises(SpecError) as info:
        compile_spec(spec.format(path))
    assert f"{path} is empty (0 bytes), and a device needs at least one sector" in str(info.value)
    assert "\n" not in str(info.value)


def test_an_empty_file_with_a_size_is_a_sparse_image(tmp_path: Path) -> None:
    assert compile_spec(f"sparse({empty(tmp_path)}, size=1M)").kind == "sparse"


def test_opening_an_empty_image_is_refused_too(tmp_path: Path) -> None:
    path = str(empty(tmp_path))
    with pytest.raises(ValueError, match="is empty"):
        open_file(path)
    with pytest.raises(ValueError, match="is empty"):
        open_sparse(path)


@pytest.mark.parametrize("spec", ["mem(0)", "memory(0)", "safe(mem(0))"])
def test_a_memory_device_of_0_bytes_is_refused(spec: str) -> None:
    """``mem(0)``; ``MemoryDevice(0)`` itself stays, for tests of 0-byte devices (an NBD
    export may be empty)."""
    with pytest.raises(SpecError, match="needs a size above 0"):
        compile_spec(spec)


async def memory() -> BlockDevice:
    return MemoryDevice(1 << 20)


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("kind", ["memory", "sparse"])
async def test_resizing_to_0_is_refused_and_changes_nothing(
    tmp_path: Path, kind: str, wrap: bool
) -> None:
    path = tmp_path / "s.img"
    inner = (
        MemoryDevice(1 << 20) if kind == "memory" else open_sparse(str(path), size_bytes=1 << 20)
    )
    device: BlockDevice = SafeDevice(inner) if wrap else inner
    try:
        with pytest.raises(Unsafe, match="cannot resize to 0 bytes: a device has at least one"):
            await device.resize(0)
        assert (await device.get_info()).size_bytes == 1 << 20
        if kind == "sparse":
            assert path.stat().st_size == 1 << 20
    finally:
        await device.aclose()


async def test_truncating_a_flat_file_to_0_is_einval() -> None:
    flat = FlatFile("disk", SafeDevice(MemoryDevice(1 << 20)), kind="memory", spec="mem(1M)")
    with pytest.raises(Unsafe) as info:
        await flat.resize(0)
    assert info.value.errno == 22
    assert (await flat.info()).size_bytes == 1 << 20


@pytest.mark.parametrize(
    "spec",
    [
        "mirror({a}, sparse({a}))",
        "mirror({a}, {a})",
        "mirror(file({a}), safe(sparse({dir}/./a.img)))",
        "mirror(sparse({a}), file({link}))",
    ],
)
def test_a_mirror_onto_its_own_image_is_a_spec_error(tmp_path: Path, spec: str) -> None:
    a = tmp_path / "a.img"
    a.write_bytes(bytes(1 << 20))
    link = tmp_path / "link.img"
    link.symlink_to(a)
    with pytest.raises(SpecError, match="the secondary is the primary itself"):
        compile_spec(spec.format(a=a, dir=tmp_path, link=link))


def test_a_mirror_onto_its_own_image_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("a.img").write_bytes(bytes(1 << 20))
    status = main(["mount", "mnt", "-d", "disk=mirror(./a.img, sparse(./a.img))"])
    err = capsys.readouterr().err
    assert status == 2 and "the secondary is the primary itself" in err, err
    assert sorted(os.listdir(tmp_path)) == ["a.img"]


@pytest.mark.parametrize(
    ("spec", "size", "now"),
    [
        ("mem(1M)", 2 << 20, "mem(2M)"),
        ("memory(1G)", 3 << 30, "memory(3G)"),
        ("mem(1M)", 1536 << 10, "mem(1536K)"),
        ("mem(1M)", 1024 + 512, "mem(1536)"),
        ("safe(mem(1M))", 1 << 40, "safe(mem(1T))"),
        ("sparse(./a.img, size=1G)", 2 << 30, "sparse(./a.img, size=2G)"),
        ("sparse(./a.img, 1G)", 512 << 20, "sparse(./a.img, 512M)"),
        ("sparse(./a.img)", 2 << 30, "sparse(./a.img, size=2G)"),
        ("sparse('./a b.img', format=raw)", 2 << 30, "sparse('./a b.img', format=raw, size=2G)"),
        ("./a.img", 2 << 30, "./a.img"),
    ],
)
def test_a_resized_spec_says_the_size_it_has_now(spec: str, size: int, now: str) -> None:
    assert resized_spec(spec, size) == now


async def test_a_flat_file_shows_its_spec_as_resized() -> None:
    flat = FlatFile("disk", MemoryDevice(1 << 20), kind="memory", spec="mem(1M)")
    await flat.resize(4 << 20)
    assert flat.spec == "mem(4M)"
