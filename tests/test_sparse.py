"""The sparse device and the file device's holes: contract, behaviour, model, spec."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockfuse.block import BlockDevice, Capability, Extent
from blockfuse.cli import main as cli_main
from blockfuse.devices import holes
from blockfuse.devices.file import open_file
from blockfuse.devices.holes import to_sector_extents
from blockfuse.devices.sparse import SparseDevice, open_sparse
from blockfuse.devices.zeroes import zero_pieces, zero_runs
from blockfuse.errors import Unimplemented, Unsafe
from blockfuse.opening import OpenContext
from blockfuse.spec import Options, SpecError, compile_spec
from blockfuse.testing import check_block_device

MiB = 1 << 20
SS = 512


def allocated(path: str | Path) -> int:
    """Bytes the filesystem holds for ``path`` (what `du` shows)."""
    return os.stat(path).st_blocks * 512


def fresh(tmp_path: Path) -> str:
    return str(tmp_path / f"s{len(list(tmp_path.iterdir()))}.img")


async def read(dev: BlockDevice, sector: int, nbytes: int) -> bytes:
    buf = bytearray(nbytes)
    await dev.read(sector, [buf])
    return bytes(buf)


# --- conformance ------------------------------------------------------------------------


async def test_sparse_conforms(tmp_path: Path) -> None:
    async def make() -> BlockDevice:
        return open_sparse(fresh(tmp_path), size_bytes=MiB)

    await check_block_device(make)


async def test_padded_sparse_conforms(tmp_path: Path) -> None:
    """A short existing file with a larger size: most of the device is virtual zeroes."""

    async def make() -> BlockDevice:
        path = fresh(tmp_path)
        Path(path).write_bytes(os.urandom(8 * SS))
        return open_sparse(path, size_bytes=MiB)

    await check_block_device(make)


# --- behaviour --------------------------------------------------------------------------


async def test_created_sparse_at_full_size(tmp_path: Path) -> None:
    path = fresh(tmp_path)
    dev = open_sparse(path, size_bytes=1 << 40)
    with trio.fail_after(10):
        assert (await dev.get_info()).size_bytes == 1 << 40
        assert await read(dev, (1 << 40) // SS - 8, 8 * SS) == bytes(8 * SS)
        await dev.write((900 << 30) // SS, [b"x" * 4096])
        assert await read(dev, (900 << 30) // SS, 4096) == b"x" * 4096
        await dev.aclose()
    assert os.path.getsize(path) == 1 << 40
    assert allocated(path) <= 64 << 10


async def test_padded_file_grows_only_as_far_as_a_write_needs(tmp_path: Path) -> None:
    path = fresh(tmp_path)
    Path(path).write_bytes(b"a" * 4096)
    dev = open_sparse(path, size_bytes=MiB)
    with trio.fail_after(10):
        assert await read(dev, 0, 3 * 4096) == b"a" * 4096 + bytes(8192)
        await dev.write(16, [bytes(4096)])  # zeroes past the end: nothing to grow
        assert os.path.getsize(path) == 4096
        await dev.write(16, [b"b" * SS])
        assert os.path.getsize(path) == 17 * SS
        assert await read(dev, 15, 3 * SS) == bytes(SS) + b"b" * SS + bytes(SS)
        await dev.aclose()


async def test_zero_blocks_are_not_allocated(tmp_path: Path) -> None:
    path = fresh(tmp_path)
    dev = open_sparse(path, size_bytes=16 * MiB)
    with trio.fail_after(10):
        await dev.write(0, [bytes(4 * MiB)])
        await dev.flush()
        assert allocated(path) == 0
        await dev.write(0, [os.urandom(MiB)])
        await dev.flush()
        assert allocated(path) >= MiB
        await dev.write(0, [bytes(MiB)])  # zeroes over data punch it out
        await dev.flush()
        assert allocated(path) == 0
        assert await read(dev, 0, MiB) == bytes(MiB)
        await dev.aclose()


async def test_mixed_write_keeps_zero_blocks_as_holes(tmp_path: Path) -> None:
    path = fresh(tmp_path)
    dev = open_sparse(path, size_bytes=MiB)
    data = b"d" * 4096 + bytes(8192) + b"e" * 4096
    with trio.fail_after(10):
        await dev.write(8, [data[:2048], data[2048:]])
        assert await read(dev, 8, len(data)) == data
        assert await dev.extents(0, MiB // SS) == [
            Extent(0, 8, False),
            Extent(8, 8, True),
            Extent(16, 16, False),
            Extent(32, 8, True),
            Extent(40, MiB // SS - 40, False),
        ]
        await dev.aclose()


async def test_discard_and_write_zeroes_punch_holes(tmp_path: Path) -> None:
    path = fresh(tmp_path)
    dev = open_sparse(path, size_bytes=4 * MiB)
    with trio.fail_after(10):
        await dev.write(0, [os.urandom(2 * MiB)])
        await dev.flush()
        before = allocated(path)
        await dev.discard(0, MiB // SS)
        await dev.write_zeroes(MiB // SS, MiB // SS // 2)
        assert await read(dev, 0, MiB + MiB // 2) == bytes(MiB + MiB // 2)
        assert allocated(path) <= before - MiB - MiB // 2
        await dev.aclose()


async def test_resize_grows_and_shrinks(tmp_path: Path) -> None:
    path = fresh(tmp_path)
    dev = open_sparse(path, size_bytes=MiB)
    with trio.fail_after(10):
        await dev.write(MiB // SS - 1, [b"z" * SS])
        await dev.resize(MiB // SS // 2)
        assert os.path.getsize(path) == MiB // 2
        await dev.resize(2 * MiB // SS)
        assert (await dev.get_info()).size_bytes == 2 * MiB
        assert await read(dev, MiB // SS - 1, SS) == bytes(SS), "shrinking dropped the data"
        await dev.flush()
        await dev.aclose()
    again = open_sparse(path)
    with trio.fail_after(5):
        assert (await again.get_info()).size_bytes == 2 * MiB, "the file records the size"
        await again.aclose()


async def test_flush_is_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync, not fdatasync: a grown or shrunk length is durable too."""
    dev = open_sparse(fresh(tmp_path), size_bytes=MiB)
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with trio.fail_after(5):
        await dev.resize(2 * MiB // SS)
        await dev.flush()
        await dev.aclose()
    assert len(synced) == 1


async def test_write_past_the_size_is_refused(tmp_path: Path) -> None:
    path = fresh(tmp_path)
    Path(path).write_bytes(b"")
    dev = open_sparse(path, size_bytes=MiB)
    with trio.fail_after(5), pytest.raises(Unsafe):
        await dev.write(MiB // SS, [b"x" * SS])
    await dev.aclose()
    assert os.path.getsize(path) == 0


async def test_file_device_extents_and_holes(tmp_path: Path) -> None:
    path = fresh(tmp_path)
    with open(path, "wb") as f:
        f.truncate(MiB)
    dev = open_file(path)
    assert {Capability.EXTENTS, Capability.DISCARD, Capability.WRITE_ZEROES} <= dev.capabilities
    with trio.fail_after(10):
        await dev.write(64, [os.urandom(8192)])
        assert await dev.extents(0, MiB // SS) == [
            Extent(0, 64, False),
            Extent(64, 16, True),
            Extent(80, MiB // SS - 80, False),
        ]
        await dev.discard(64, 16)
        assert await dev.extents(0, MiB // SS) == [Extent(0, MiB // SS, False)]
        assert await read(dev, 64, 8192) == bytes(8192)
        with pytest.raises(Unimplemented):
            await dev.resize(1)
        await dev.aclose()


async def test_concurrent_growth_reads_and_resizes(tmp_path: Path) -> None:
    """Writes that grow the file race reads and a same-size resize; nothing is lost."""
    path = fresh(tmp_path)
    Path(path).write_bytes(b"")
    dev = open_sparse(path, size_bytes=MiB)
    blobs = {i: os.urandom(4096) for i in range(0, MiB // 4096, 3)}

    async def write_then_read(i: int) -> None:
        await dev.write(i * 8, [blobs[i]])
        assert await read(dev, i * 8, 4096) == blobs[i]

    async def reader() -> None:
        for i in range(0, MiB // 4096):
            await read(dev, i * 8, 8192 if i < MiB // 4096 - 1 else 4096)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in blobs:
                nursery.start_soon(write_then_read, i)
            nursery.start_soon(reader)
            nursery.start_soon(dev.resize, MiB // SS)
        for i, blob in blobs.items():
            assert await read(dev, i * 8, 4096) == blob
        await dev.aclose()
    assert os.path.getsize(path) == MiB


async def test_extents_may_stop_early_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(holes, "MAX_EXTENTS", 3)
    dev = open_sparse(fresh(tmp_path), size_bytes=MiB)
    with trio.fail_after(10):
        for block in (1, 5, 9, 13):
            await dev.write(block * 8, [b"q" * 4096])
        found: list[Extent] = []
        while not found or found[-1].end < MiB // SS:
            start = found[-1].end if found else 0
            part = await dev.extents(start, MiB // SS - start)
            assert part and part[0].sector == start and len(part) <= 4
            found += part
        assert [e.sector for e in found if e.is_data] == [8, 40, 72, 104]
        await dev.aclose()


def test_zero_runs_cut_at_file_blocks() -> None:
    data = memoryview(bytearray(b"x" * 512 + bytes(8192) + b"y" * 512))
    runs = zero_runs(3584, [data[:1000], data[1000:]])
    assert [(r.offset, r.length, r.zero) for r in runs] == [
        (3584, 512, False),
        (4096, 8192, True),
        (12288, 512, False),
    ]


@settings(max_examples=300, deadline=None)
@given(
    offset=st.integers(0, 64).map(lambda n: n * SS),
    sectors=st.integers(0, 400),
    zeroed=st.lists(st.tuples(st.integers(0, 400 * SS), st.integers(0, 300 * SS)), max_size=6),
    seed=st.integers(0, 2**32),
)
def test_zero_pieces_match_brute_force(
    offset: int, sectors: int, zeroed: list[tuple[int, int]], seed: int
) -> None:
    data = bytearray(random.Random(seed).randbytes(sectors * SS))
    for start, length in zeroed:
        data[start : start + length] = bytes(len(data[start : start + length]))
    cuts = sorted({0, len(data), *range(-offset % 4096, len(data), 4096)})
    expected: list[tuple[int, int]] = []
    for a, b in itertools.pairwise(cuts):
        if b > a and not any(data[a:b]):
            if expected and expected[-1][1] == a:
                a = expected.pop()[0]
            expected.append((a, b))
    assert zero_pieces(offset, memoryview(data)) == expected


def test_sector_extents_round_data_outward() -> None:
    runs = [(0, 4096, True), (4096, 100, False), (4196, 412, True), (4608, 4096, False)]
    assert to_sector_extents(runs, 512) == [Extent(0, 9, True), Extent(9, 8, False)]


# --- a model: random operations against a bytearray --------------------------------------

SECTORS = 64
OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("write"),
            st.integers(0, 4 * SECTORS),
            st.integers(1, 24),
            st.sampled_from(["zero", "data", "mixed"]),
        ),
        st.tuples(st.just("discard"), st.integers(0, 4 * SECTORS), st.integers(1, 24)),
        st.tuples(st.just("zeroes"), st.integers(0, 4 * SECTORS), st.integers(1, 24)),
        st.tuples(st.just("resize"), st.integers(1, 4 * SECTORS)),  # 0 is refused
        st.tuples(st.just("read"), st.integers(0, 4 * SECTORS), st.integers(1, 24)),
    ),
    max_size=25,
)


def payload(kind: str, nbytes: int, seed: int) -> bytes:
    if kind == "zero":
        return bytes(nbytes)
    blob = bytes((seed + i) % 251 + 1 for i in range(nbytes))
    if kind == "mixed":
        blob = bytes(c if (i // 4096) % 2 else 0 for i, c in enumerate(blob))
    return blob


async def apply(dev: SparseDevice, model: bytearray, op: tuple, step: int) -> None:  # type: ignore[type-arg]
    size = len(model) // SS
    if op[0] == "resize":
        await dev.resize(op[1])
        del model[op[1] * SS :]
        model.extend(bytes(op[1] * SS - len(model)))
        return
    sector = min(op[1], size)
    count = min(op[2], size - sector)
    if op[0] == "write":
        blob = payload(op[3], count * SS, step)
        await dev.write(sector, [blob])
        model[sector * SS : (sector + count) * SS] = blob
    elif op[0] in ("discard", "zeroes"):
        await (dev.discard if op[0] == "discard" else dev.write_zeroes)(sector, count)
        model[sector * SS : (sector + count) * SS] = bytes(count * SS)
    assert await read(dev, sector, count * SS) == model[sector * SS : (sector + count) * SS]


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS, prefix=st.integers(0, SECTORS))
def test_sparse_matches_a_bytearray(tmp_path: Path, ops: list, prefix: int) -> None:  # type: ignore[type-arg]
    path = fresh(tmp_path)
    start = os.urandom(prefix * SS)
    Path(path).write_bytes(start)
    model = bytearray(start + bytes((SECTORS - prefix) * SS))

    async def run() -> None:
        dev = open_sparse(path, size_bytes=SECTORS * SS)
        with trio.fail_after(10):
            for step, op in enumerate(ops):
                await apply(dev, model, op, step)
            assert await read(dev, 0, len(model)) == model
            assert os.path.getsize(path) <= len(model)
            extents = await dev.extents(0, len(model) // SS)
            for e in extents:
                if not e.is_data:
                    assert not any(model[e.sector * SS : e.end * SS]), "a hole holds data"
            await dev.aclose()

    trio.run(run)
    os.unlink(path)


# --- spec -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("size=1000", "size 1000 is not a whole number of 512-byte sectors"),
        ("size=-512", "bad size .-512.: a size cannot be negative"),
        ("size=lots", "bad size 'lots'"),
        ("", "does not exist; give its size to create it"),
    ],
)
def test_bad_sparse_specs_create_nothing(tmp_path: Path, args: str, message: str) -> None:
    path = tmp_path / "new.img"
    spec = f"sparse({path}{', ' + args if args else ''})"
    with pytest.raises(SpecError, match=message) as info:
        compile_spec(spec)
    assert "\n" not in str(info.value)
    assert not path.exists()


def test_sparse_spec_checks_the_path(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"the directory .* does not exist"):
        compile_spec(f"sparse({tmp_path}/no/dir.img, size=1G)")
    with pytest.raises(SpecError, match="not a regular file or block device"):
        compile_spec(f"sparse({tmp_path}, size=1G)")
    with pytest.raises(SpecError, match="not a regular file or block device"):
        compile_spec("sparse(/dev/null)")
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(SpecError, match="not a whole number of 512-byte sectors"):
        compile_spec(f"sparse({odd}, size=1M)")
    big = tmp_path / "big.img"
    big.write_bytes(bytes(4096))
    with pytest.raises(SpecError, match="more than size=512"):
        compile_spec(f"sparse({big}, size=512)")
    assert not (tmp_path / "no").exists()


async def test_sparse_spec_opens_and_creates(tmp_path: Path, nursery: trio.Nursery) -> None:
    path = tmp_path / "new.img"
    recipe = compile_spec(f"sparse({path}, size=1G)")
    assert not path.exists(), "compiling creates nothing"
    with trio.fail_after(5):
        ctx = OpenContext(nursery)
        dev = await recipe.open(ctx)
        assert ctx.created == [str(path)], "the new file is noted, to be removed on failure"
        assert (await dev.get_info()).size_bytes == 1 << 30
        await dev.aclose()
        dev = await compile_spec(f"sparse({path})").open(OpenContext(nursery))
        assert (await dev.get_info()).size_bytes == 1 << 30, "a file keeps its own length"
        await dev.aclose()
    assert path.stat().st_size == 1 << 30 and allocated(path) == 0


async def test_mirror_secondary_takes_the_peer_size(tmp_path: Path, nursery: trio.Nursery) -> None:
    path = tmp_path / "secondary.img"
    recipe = compile_spec(f"safe(sparse({path}))", Options(size_from_peer=True))
    assert not path.exists() and recipe.open_sized is not None
    with trio.fail_after(5):
        dev = await recipe.open_sized(OpenContext(nursery), 64 * MiB)
        assert (await dev.get_info()).size_bytes == 64 * MiB
        await dev.aclose()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sparse(new.img)", "new.img does not exist; give its size to create it"),
        ("sparse(no/dir.img, size=1G)", "the directory"),
        ("sparse(new.img, size=1000)", "not a whole number of 512-byte sectors"),
        ("sparse(new.img, size=-1G)", "a size cannot be negative"),
        ("sparse(new.img, size=big)", "bad size 'big'"),
        ("sparse(new.img, size=0)", "a sparse image needs a size above 0"),
    ],
)
def test_cli_refuses_bad_sparse_specs_and_creates_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    spec: str,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli_main(["mount", "mnt", "-d", f"disk={spec}"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_a_size_the_filesystem_cannot_hold_is_refused_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with tempfile.TemporaryFile(dir=tmp_path) as probe, contextlib.suppress(OSError):
        os.ftruncate(probe.fileno(), 100 << 50)
        pytest.skip("this filesystem holds a 100 PiB file (ext4, where CI runs, does not)")
    (tmp_path / "old.img").write_bytes(b"")  # exists, shorter than size=: padded with zeroes
    assert cli_main(["mount", "mnt", "-d", "disk=sparse(old.img, size=100P)"]) == 2
    err = capsys.readouterr().err
    assert "more than the filesystem of old.img can hold in one file" in err
    assert os.listdir(tmp_path) == ["old.img"] and (tmp_path / "old.img").stat().st_size == 0
