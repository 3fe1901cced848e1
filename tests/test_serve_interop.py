"""Real NBD clients against our server (in this process, on a Unix socket or 127.0.0.1):
nbdinfo, nbdcopy, nbdsh (libnbd), qemu-img, qemu-io, qemu-nbd -L, nbd-client -l.  Each
client is a process started by the test and killed by its PID if it outlives it."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from blockfuse.devices.file import open_file
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.mirror import open_mirror
from blockfuse.devices.readonly import ReadOnlyDevice
from blockfuse.devices.safe import SafeDevice
from blockfuse.devices.sparse import open_sparse
from blockfuse.serve.listen import Address, listen
from blockfuse.serve.runtime import running

from .servekit import Served, export_of, nbdsh, run, serving

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 16 * MiB
DATA_AT = (1 * MiB, 5 * MiB + 4096)
"""Where the sparse test image holds 64 KiB of data each; the rest are holes."""


def sparse_image(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset in DATA_AT:
            f.seek(offset)
            f.write(os.urandom(64 << 10))
    return path


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@asynccontextmanager
async def sparse_server(tmp: Path, **kw: bool) -> AsyncIterator[tuple[Served, Path]]:
    """A sparse device on an image with data at ``DATA_AT``, served as ``disk``."""
    image = sparse_image(tmp / "disk.img")
    device = SafeDevice(open_sparse(str(image), size_bytes=SIZE))
    async with serving([export_of(device, spec=f"sparse({image})")], tmp, **kw) as s:
        yield s, image
    await device.aclose()


# --- nbdinfo ----------------------------------------------------------------------------


async def test_nbdinfo_lists_every_export_with_its_description(short_tmp: Path) -> None:
    exports = [
        export_of(MemoryDevice(SIZE), "disk", "mem(16M)"),
        export_of(ReadOnlyDevice(MemoryDevice(MiB)), "ro", "a read-only one"),
    ]
    async with serving(exports, short_tmp) as s:
        out = await run("nbdinfo", "--list", "--json", s.uri(""))
        listed = json.loads(out.stdout)["exports"]
        assert [(e["export-name"], e["description"]) for e in listed] == [
            ("disk", "mem(16M)"),
            ("ro", "a read-only one"),
        ]
        assert [e["is_read_only"] for e in listed] == [False, True]
        assert (await run("nbdinfo", "--size", s.uri(""))).stdout.strip() == str(SIZE).encode()
        info = json.loads((await run("nbdinfo", "--json", s.uri("disk"))).stdout)
        disk = info["exports"][0]
        for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df",
                     "can_multi_conn", "can_cache"):  # fmt: skip
            assert disk[flag] is True, flag
        assert (disk["block_size_minimum"], disk["block_size_maximum"]) == (1, 32 * MiB)
        assert info["protocol"] == "newstyle-fixed" and disk["contexts"] == ["base:allocation"]
        ro = await run("nbdinfo", "--is", "read-only", s.uri("ro"), check=False)
        assert ro.returncode == 0


async def test_nbdinfo_map_shows_the_holes_of_a_sparse_device(short_tmp: Path) -> None:
    async with sparse_server(short_tmp) as (s, _):
        out = json.loads((await run("nbdinfo", "--map", "--json", s.uri())).stdout)
        runs = [(e["offset"], e["length"], e["type"]) for e in out]
        expected, at = [], 0
        for offset in DATA_AT:
            expected += [(at, offset - at, 3), (offset, 64 << 10, 0)]
            at = offset + (64 << 10)
        expected.append((at, SIZE - at, 3))
        assert runs == expected
        qemu = json.loads(
            (await run("qemu-img", "map", "-f", "raw", "--output=json", s.uri())).stdout
        )
        data = [(m["start"], m["length"]) for m in qemu if m["data"]]
        assert data == [(offset, 64 << 10) for offset in DATA_AT]


async def test_listing_refused_by_policy(short_tmp: Path) -> None:
    async with serving([export_of(MemoryDevice(MiB))], short_tmp, listing=False) as s:
        out = await run("nbdinfo", "--list", s.uri(""), check=False)
        assert out.returncode == 1 and b"list" in out.stderr
        script = (
            "try:\n    h.opt_list(lambda n, d: 0)\nexcept nbd.Error as e:\n    print('refused')\n"
            "h.opt_go()\nprint(h.get_size())"
        )
        result = await run("nbdsh", "--opt-mode", "-u", s.uri("disk"), "-c", script,
                           system_python=True)  # fmt: skip
        assert result.stdout.split() == [b"refused", str(MiB).encode()]


# --- nbdcopy ------------------------------------------------------------------------------


async def test_nbdcopy_out_of_and_into_an_export_keeps_it_sparse(short_tmp: Path) -> None:
    async with sparse_server(short_tmp) as (s, image):
        out = short_tmp / "out.raw"
        await run("nbdcopy", s.uri(), str(out))
        assert out.read_bytes() == image.read_bytes()
        assert allocated(out) <= 3 * (64 << 10)
        source = sparse_image(short_tmp / "source.raw")
        await run("nbdcopy", "--flush", str(source), s.uri())
        assert image.read_bytes() == source.read_bytes()
        assert allocated(image) <= 8 * (64 << 10)  # holes stayed holes
        await run("nbdcopy", "--connections=4", "--requests=32", str(source), s.uri())
        assert image.read_bytes() == source.read_bytes()


# --- qemu ---------------------------------------------------------------------------------


async def test_qemu_img_info_compare_and_convert_both_ways(short_tmp: Path) -> None:
    async with sparse_server(short_tmp) as (s, image):
        info = json.loads(
            (await run("qemu-img", "info", "-f", "raw", "--output=json", s.uri())).stdout
        )
        assert info["virtual-size"] == SIZE
        await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), s.uri())
        out = short_tmp / "out.raw"
        await run("qemu-img", "convert", "-f", "raw", "-O", "raw", s.uri(), str(out))
        assert out.read_bytes() == image.read_bytes()
        other = short_tmp / "other.raw"
        other.write_bytes(os.urandom(SIZE))
        await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(other), s.uri())
        assert image.read_bytes() == other.read_bytes()
        await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(other), s.uri())


async def test_qemu_io_patterns_aio_discard_and_zeroes(short_tmp: Path) -> None:
    (short_tmp / "f.img").write_bytes(bytes(SIZE))
    device = SafeDevice(open_file(str(short_tmp / "f.img")))
    async with serving([export_of(device)], short_tmp) as s:
        writes = [f"aio_write -P {0x10 + i} {i * 65536} 64k" for i in range(32)]
        reads = [f"aio_read -P {0x10 + i} {i * 65536} 64k" for i in range(32)]
        commands = [*writes, "aio_flush", *reads, "aio_flush",
                    "write -z 0 64k", "read -P 0 0 64k", "write -z -u 128k 64k",
                    "read -P 0 128k 64k", "discard 256k 64k", "write -P 0x5a 1M 4k",
                    "read -P 0x5a 1M 4k", "flush"]  # fmt: skip
        argv = ["qemu-io", "-f", "raw"]
        for command in commands:
            argv += ["-c", command]
        out = await run(*argv, s.uri())
        assert b"fail" not in out.stdout.lower(), out.stdout
        data = (short_tmp / "f.img").read_bytes()
        assert data[3 * 65536 : 4 * 65536] == bytes([0x13]) * 65536
        assert data[:65536] == bytes(65536) and data[MiB : MiB + 4096] == b"\x5a" * 4096
    await device.aclose()


async def test_qemu_nbd_lists_our_exports(short_tmp: Path) -> None:
    exports = [export_of(MemoryDevice(MiB), "a", "first disk"), export_of(MemoryDevice(MiB), "b")]
    async with serving(exports, short_tmp) as s:
        out = (await run("qemu-nbd", "-L", "-k", str(s.address.path))).stdout.decode()
        assert "export: 'a'" in out and "description: first disk" in out and "export: 'b'" in out
        assert "base:allocation" in out


async def test_nbd_client_lists_over_tcp(short_tmp: Path) -> None:
    listening = await listen([Address(host="127.0.0.1", port=0)])
    address = listening.addresses[0]
    async with running([export_of(MemoryDevice(MiB), "tcpdisk")], listening):
        out = await run("nbd-client", "-l", "127.0.0.1", str(address.port), check=False)
        assert b"tcpdisk" in out.stdout, out
        info = await run("nbdinfo", "--size", address.uri("tcpdisk"))
        assert info.stdout.strip() == str(MiB).encode()


# --- libnbd: every command and flag, and misuse -------------------------------------------


async def test_nbdsh_commands_and_flags(short_tmp: Path) -> None:
    async with sparse_server(short_tmp) as (s, image):
        script = """
import errno
h.pwrite(b"a" * 4096, 0, nbd.CMD_FLAG_FUA)
h.flush()
h.pwrite(b"xyz", 1001)
assert h.pread(5, 1000) == b"axyza", h.pread(5, 1000)
h.trim(65536, 65536)
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
h.zero(1 << 20, 65536, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(65536, 1 << 20) == bytes(65536)
h.cache(1 << 20, 0)
seen = []
h.block_status(8 << 20, 0, lambda ctx, off, ents, err: seen.append((ctx, off, list(ents))))
assert seen[0][0] == "base:allocation", seen
assert seen[0][2][:4] == [4096, 0, 5 * 2**20, 3], seen  # zeroes were punched: holes
one = []
h.block_status(8 << 20, 1 << 20, lambda c, o, e, r: one.append(list(e)), nbd.CMD_FLAG_REQ_ONE)
assert one == [[4 * 2**20 + 4096, 3]], one
chunks = []
h.pread_structured(12000, 0, lambda buf, off, st, err: chunks.append((off, len(buf))) or 0,
                   nbd.CMD_FLAG_DF)
assert chunks == [(0, 12000)], chunks  # DF: one data chunk, holes and all
print("ok")
"""
        out = await run("nbdsh", "--base-allocation", "-u", s.uri(), "-c", script,
                        system_python=True)  # fmt: skip
        assert out.stdout.strip() == b"ok"
        assert image.read_bytes()[1000:1005] == b"axyza"


async def test_requests_past_the_end_over_the_maximum_and_to_a_read_only_export(
    short_tmp: Path,
) -> None:
    exports = [
        export_of(MemoryDevice(MiB)),
        export_of(ReadOnlyDevice(MemoryDevice(MiB)), "ro"),
        export_of(MemoryDevice(64 * MiB), "big"),
    ]
    helper = """
def code(call, *args):
    try:
        call(*args)
    except nbd.Error as e:
        return e.errno  # libnbd gives the errno's name
    return "ok"
"""
    edges = """
print(code(h.pread, 512, (1 << 20) - 100), code(h.pwrite, b"x" * 512, (1 << 20) - 100),
      code(h.zero, 4096, 1 << 20), code(h.pread, 512, 1 << 20))
"""
    too_big = """
print(code(h.pread, (32 << 20) + 4096, 0), code(h.pwrite, bytes((32 << 20) + 4096), 0),
      code(h.pread, 4096, 0))
"""
    async with serving(exports, short_tmp) as s:
        for export, script, expected in [
            ("disk", edges, "EINVAL ENOSPC ENOSPC EINVAL"),
            ("ro", edges, "EINVAL EPERM EPERM EINVAL"),
            ("big", too_big, "EINVAL EINVAL ok"),  # refused after the payload: in sync
        ]:
            uri = s.uri(export)
            out = await run("nbdsh", "-c", "h.set_strict_mode(0)", "-c", f"h.connect_uri({uri!r})",
                            "-c", helper, "-c", script, system_python=True)  # fmt: skip
            assert out.stdout.decode().split() == expected.split(), export


async def test_fast_zero_is_refused_where_zeroing_is_not_fast(short_tmp: Path) -> None:
    primary = MemoryDevice(MiB)
    await primary.write(0, [b"p" * MiB])
    async with open_mirror(primary, MemoryDevice(MiB), chunk=64 << 10) as mirror:
        await mirror.wait_synced()
        async with serving([export_of(mirror, spec="mirror(...)")], short_tmp) as s:
            script = """
import errno
try:
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
except nbd.Error as e:
    print(e.errno)
h.zero(4096, 0)
print(h.pread(4, 0), h.pread(4, 4096))
"""
            out = (await nbdsh(s.uri(), script)).split()
            zeroes = "bytearray(b'\\x00\\x00\\x00\\x00')"
            assert out == ["ENOTSUP", zeroes, "bytearray(b'pppp')"]  # refused, then zeroed


async def test_old_clients_export_name_and_simple_replies(short_tmp: Path) -> None:
    async with serving([export_of(MemoryDevice(MiB))], short_tmp) as s:
        base = ["nbdsh", "-c"]
        for setup, expected in [
            ("h.set_handshake_flags(0)", "newstyle False"),  # EXPORT_NAME + 124 zeroes
            ("h.set_request_structured_replies(False)", "newstyle-fixed False"),
        ]:
            script = (
                "h.pwrite(b'q' * 100, 50); "
                "print(h.get_protocol(), h.get_structured_replies_negotiated())"
            )
            out = await run(*base, setup, "-c", f"h.connect_uri({s.uri()!r})", "-c", script,
                            system_python=True)  # fmt: skip
            assert out.stdout.decode().strip() == expected
        missing = await run("nbdinfo", s.uri("nope"), check=False)
        assert missing.returncode == 1


async def test_many_requests_in_flight_from_libnbd(short_tmp: Path) -> None:
    async with serving([export_of(MemoryDevice(SIZE))], short_tmp) as s:
        script = """
bufs = [nbd.Buffer(4096) for i in range(64)]
for i in range(64):
    h.aio_pwrite(bytes([i]) * 4096, i * 4096)
h.aio_flush()
while h.aio_in_flight() > 0:
    h.poll(-1)
cookies = [h.aio_pread(b, i * 4096) for i, b in enumerate(bufs)]
while h.aio_in_flight() > 0:
    h.poll(-1)
assert all(h.aio_command_completed(c) for c in cookies)
assert all(b.to_bytearray() == bytes([i]) * 4096 for i, b in enumerate(bufs))
print("ok")
"""
        assert (await nbdsh(s.uri(), script)).strip() == "ok"
