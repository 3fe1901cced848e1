"""The scratch directory's handlers in process (no mount): names, renames, lifetimes."""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace

import pyfuse3
import pytest

from blockfuse.devices.memory import MemoryDevice
from blockfuse.fuse.scratch import INODE_SPAN, ScratchDir, open_scratch_dir

from . import timing

time_limit = timing.time_limit(30)

UNIT = 4096
CTX = SimpleNamespace(uid=os.getuid(), gid=os.getgid())


async def make_dir(units: int = 8) -> ScratchDir:
    return await open_scratch_dir("tmp", MemoryDevice(units * UNIT), UNIT, 0, "memory", "mem")


async def create(d: ScratchDir, name: bytes, data: bytes = b"") -> int:
    info, attr = await d.create(d.inode, name, 0o644, os.O_RDWR, CTX)
    if data:
        await d.write(info.fh, 0, data)
    return int(attr.st_ino)


async def content(d: ScratchDir, name: bytes) -> bytes:
    inode = (await d.lookup(d.inode, name, CTX)).st_ino
    return bytes(await d.read(inode, 0, 1 << 20))


async def expect_errno(err: int, call: object) -> None:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await call  # type: ignore[misc]
    assert info.value.errno == err


async def test_inodes_lie_in_the_directory_range() -> None:
    d = await make_dir()
    assert d.inode == INODE_SPAN and d.owns(d.inode)
    inode = await create(d, b"a")
    assert d.owns(inode) and not d.owns(2 * INODE_SPAN)


async def test_rename_replaces_exchanges_and_refuses_to_replace() -> None:
    d = await make_dir()
    a, b = await create(d, b"a", b"AAA"), await create(d, b"b", b"BB")
    await d.release(a)
    await d.release(b)
    await d.rename(d.inode, b"a", d.inode, b"b", pyfuse3.RENAME_EXCHANGE, CTX)
    assert (await content(d, b"a"), await content(d, b"b")) == (b"BB", b"AAA")
    await expect_errno(
        errno.EEXIST, d.rename(d.inode, b"a", d.inode, b"b", pyfuse3.RENAME_NOREPLACE, CTX)
    )
    await expect_errno(
        errno.ENOENT, d.rename(d.inode, b"a", d.inode, b"c", pyfuse3.RENAME_EXCHANGE, CTX)
    )
    await d.rename(d.inode, b"a", d.inode, b"b", 0, CTX)  # replaces the file created as a
    assert await content(d, b"b") == b"BB"
    await expect_errno(errno.ENOENT, d.lookup(d.inode, b"a", CTX))
    await d.open(a, os.O_RDONLY, CTX)  # by a path the kernel looked up before the rename
    assert bytes(await d.read(a, 0, 3)) == b"AAA"  # the old contents, as on ext4
    await d.release(a)
    assert d.swap.free_bytes == 6 * UNIT
    await d.forget([(a, 2)])  # its create and one lookup: now nothing can reach it
    assert d.swap.free_bytes == 7 * UNIT


async def test_an_unlinked_file_is_freed_once_closed_and_forgotten() -> None:
    d = await make_dir()
    inode = await create(d, b"f", b"x" * UNIT * 2)
    await d.open(inode, os.O_RDONLY, CTX)
    await d.unlink(d.inode, b"f", CTX)
    assert bytes(await d.read(inode, 0, 3)) == b"xxx"
    assert d.swap.free_bytes == 6 * UNIT
    await d.release(inode)
    assert d.swap.free_bytes == 6 * UNIT
    await d.release(inode)
    assert d.swap.free_bytes == 6 * UNIT  # the kernel may still open it
    await d.forget([(inode, 1)])
    assert d.swap.free_bytes == 8 * UNIT
    await expect_errno(errno.ENOENT, d.getattr(inode))


async def test_names_and_kinds_a_regular_filesystem_refuses() -> None:
    d = await make_dir()
    await create(d, b"f")
    await expect_errno(errno.EEXIST, d.create(d.inode, b"f", 0o644, 0, CTX))
    await expect_errno(errno.ENAMETOOLONG, d.create(d.inode, b"n" * 256, 0o644, 0, CTX))
    await expect_errno(errno.EINVAL, d.create(d.inode, b"a/b", 0o644, 0, CTX))
    await expect_errno(errno.EPERM, d.mkdir(d.inode, b"sub", 0o755, CTX))
    await expect_errno(errno.EPERM, d.mknod(d.inode, b"fifo", 0o10644, 0, CTX))
    await expect_errno(errno.ENOTDIR, d.rmdir(d.inode, b"f", CTX))
    await expect_errno(errno.ENOENT, d.unlink(d.inode, b"missing", CTX))


async def test_open_with_o_trunc_empties_the_file() -> None:
    d = await make_dir()
    inode = await create(d, b"f", b"data" * 3000)
    await d.open(inode, os.O_WRONLY | os.O_TRUNC, CTX)
    assert (await d.getattr(inode)).st_size == 0
    assert d.swap.free_bytes == 8 * UNIT


async def test_the_directory_keeps_its_mode_and_times_and_makes_no_whiteouts() -> None:
    d = await make_dir()
    attr = pyfuse3.EntryAttributes()
    attr.st_mode, attr.st_mtime_ns = 0o700, 10**18
    fields = SimpleNamespace(
        update_mode=True, update_mtime=True, update_uid=False, update_gid=False,
        update_size=False,
    )  # fmt: skip
    await d.setattr(d.inode, attr, fields, None, CTX)
    now = await d.getattr(d.inode)
    assert (now.st_mode, now.st_mtime_ns) == (0o40700, 10**18)
    await create(d, b"a")
    rename_whiteout = 1 << 2
    await expect_errno(errno.EINVAL, d.rename(d.inode, b"a", d.inode, b"b", rename_whiteout, CTX))
