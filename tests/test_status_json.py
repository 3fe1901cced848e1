"""``blockfuse status --json``: every key of ``report.KEYS`` present for each device
kind (``null`` when there is nothing to say), the same through a mount's attributes and
a server's control socket; numbers as numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from blockfuse.block import BlockDevice
from blockfuse.cli.report import KEYS, Report, report_json, typed
from blockfuse.devices.file import open_file
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.mirror import open_mirror
from blockfuse.devices.safe import SafeDevice
from blockfuse.devices.sparse import open_sparse
from blockfuse.sectors import DeviceBytes
from blockfuse.serve.exports import Export, facts

from .mirrorkit import SIZE, image
from .nbdserver import FakeServer
from .test_nbd_transport import remote

DEVICE = set(KEYS["device"])


async def entry(kind: str, device: BlockDevice) -> dict[str, object]:
    """A device's entry in the JSON, as a server's control socket reports it (the
    attributes of a mount's flat file have the same keys and values)."""
    values = await facts(Export("disk", DeviceBytes(device), kind, f"{kind}(...)"))
    out = typed({"name": "disk", **values})
    json.dumps(out)  # plain JSON
    return out


async def test_memory_and_file_devices_have_the_device_keys(tmp_path: Path) -> None:
    for kind, device in [
        ("memory", MemoryDevice(SIZE)),
        ("file", open_file(image(tmp_path, "f"))),
        ("safe", SafeDevice(MemoryDevice(SIZE))),
    ]:
        out = await entry(kind, device)
        assert set(out) == DEVICE, kind
        assert out["size"] == SIZE and out["sector_size"] == 512 and out["io_errors"] == 0
        assert out["read_only"] is False


async def test_a_sparse_image_adds_its_keys(tmp_path: Path) -> None:
    dev = open_sparse(str(tmp_path / "s.img"), size_bytes=SIZE)
    out = await entry("sparse", SafeDevice(dev))
    assert set(out) == DEVICE | set(KEYS["sparse"])
    assert isinstance(out["allocated"], int) and out["backing_length"] == SIZE


async def test_an_nbd_export_adds_its_keys(nursery: trio.Nursery) -> None:
    out = await entry("nbd", await remote(nursery, FakeServer()))
    assert set(out) == DEVICE | set(KEYS["nbd"])
    assert out["connection"] == "connected" and out["reconnects"] == 0


async def test_a_mirror_adds_its_keys_whatever_its_state(autojump_clock: object) -> None:
    async with open_mirror(MemoryDevice(SIZE), MemoryDevice(SIZE), chunk=8192, rate=64 << 10) as m:
        copying = await entry("mirror", m)
        assert set(copying) == DEVICE | set(KEYS["mirror"])
        assert copying["state"] == "copying" and copying["rate_limit"] == 64 << 10
        assert copying["last_error"] is None and copying["notice"] is None
        assert isinstance(copying["progress"], int) and isinstance(copying["total"], int)
        m.set_rate(None)
        await m.wait_synced()
        synced = await entry("mirror", m)
        assert set(synced) == set(copying)
        assert synced["eta"] == 0 and synced["rate_limit"] is None


async def test_a_mirror_of_an_nbd_export_shows_the_connection(
    nursery: trio.Nursery, autojump_clock: object
) -> None:
    primary = await remote(nursery, FakeServer(size=SIZE))
    async with open_mirror(primary, MemoryDevice(SIZE), chunk=8192) as m:
        out = await entry("mirror", m)
        assert set(KEYS["mirror"]) <= set(out)
        assert out["primary_connection"] == "connected" and out["primary_reconnects"] == 0


def test_a_report_has_the_same_keys_for_a_mount_and_a_server() -> None:
    mount = report_json(Report("mount", "/mnt", [], pid=12))
    server = report_json(Report("server", "/run/x.ctl", [], server={}, pid=13))
    assert set(mount) == {"source", "path", "pid", "devices", "scratch"}
    assert set(server) == {"source", "path", "pid", "devices", "server"}


@pytest.mark.parametrize(("value", "expected"), [("12", 12), ("", None), ("x", None)])
def test_numbers_are_numbers(value: str, expected: int | None) -> None:
    assert typed({"name": "d", "size": value})["size"] == expected
