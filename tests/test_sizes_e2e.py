"""Sizes as users change them: ``truncate -s 0`` is refused like ``mem(0)``, and a resized
device's status says the size it has now (issue 17)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .mounting import attr, blockfuse_command, mounted
from .timing import time_limit

limit = time_limit(60)
pytestmark = pytest.mark.e2e


def truncate(path: Path, size: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["truncate", "-s", size, str(path)], capture_output=True, text=True)


def test_truncate_to_0_is_refused_and_the_image_keeps_its_size(tmp_path: Path) -> None:
    image = tmp_path / "s.img"
    devices = ["ram=mem(1M)", f"disk=sparse({image}, size=1M)"]
    with mounted(tmp_path / "mnt", devices) as m:
        for name in ("ram", "disk"):
            refused = truncate(m.path(name), "0")
            assert refused.returncode == 1 and "Invalid argument" in refused.stderr
            assert m.path(name).stat().st_size == 1 << 20
    assert image.stat().st_size == 1 << 20


def test_an_odd_size_is_refused_too(tmp_path: Path) -> None:
    """Not a whole number of sectors: EINVAL, as the README says (not rounded)."""
    with mounted(tmp_path / "mnt", ["ram=mem(1M)"]) as m:
        refused = truncate(m.path("ram"), "1000")
        assert refused.returncode == 1 and "Invalid argument" in refused.stderr
        assert m.path("ram").stat().st_size == 1 << 20


def test_a_resized_device_shows_the_spec_it_has_now(tmp_path: Path) -> None:
    image = tmp_path / "s.img"
    devices = ["ram=mem(1M)", f"disk=sparse({image}, size=1M)"]
    with mounted(tmp_path / "mnt", devices) as m:
        assert truncate(m.path("ram"), "3M").returncode == 0
        assert truncate(m.path("disk"), "2G").returncode == 0
        assert attr(m, "spec", "ram") == "mem(3M)"
        assert attr(m, "spec", "disk") == f"sparse({image}, size=2G)"
        status = subprocess.run(
            blockfuse_command("status", str(m.mountpoint)), capture_output=True, text=True,
            timeout=30,
        )  # fmt: skip
    assert "ram: memory, 3 MiB  mem(3M)" in status.stdout, status.stdout
    assert f"disk: sparse, 2 GiB  sparse({image}, size=2G)" in status.stdout, status.stdout
