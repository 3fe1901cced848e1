"""A scratch directory in the mount: regular files kept in a swapfs, gone at unmount.

``--scratch NAME=SPEC`` shows ``MOUNTPOINT/NAME/``; each file in it is one swapfs handle
on the device.  The directory owns the inode range ``[base, base + INODE_SPAN)``: the
directory itself is ``base``, its files ``base+1``, ``base+2``, ... (never reused within
a mount), and an open file's FUSE file handle is its inode.  ``BlockFS`` hands every
request about those numbers here.

A file's life follows POSIX.  ``unlink``, or a ``rename`` over it, removes the name at
once; the space is freed when the file has neither a name nor an open file (the
kernel's ``release``), so a process that still has it open keeps reading and writing
it.  Lookup counts (``forget``) decide only when the inode number is forgotten.

There is one level only: ``mkdir``, ``symlink``, ``link`` and device nodes fail with
EPERM, which is what a filesystem without them answers.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyfuse3

from ..block import BlockDevice
from ..errors import Unsafe
from ..swap import Handle, Swap, open_swap
from ..units import format_size, format_spec_size
from .attrs import entry_attributes

INODE_SPAN = 1 << 32
NAME_MAX = 255


def fail(err: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(err)


def check_name(name: bytes) -> None:
    """Refuse names a regular filesystem would: too long, or not one path component."""
    if len(name) > NAME_MAX:
        raise fail(errno.ENAMETOOLONG)
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise fail(errno.EINVAL)


@dataclass(eq=False)
class Attributes:
    """What chmod, chown and touch change: of a file, or of the directory itself."""

    mode: int
    uid: int
    gid: int
    time_ns: int


def set_attributes(target: Attributes, attr: pyfuse3.EntryAttributes, fields: Any) -> None:
    """What a setattr changes besides the size; the file type stays."""
    if fields.update_mode:
        target.mode = stat.S_IFMT(target.mode) | (attr.st_mode & 0o7777)
    if fields.update_uid:
        target.uid = attr.st_uid
    if fields.update_gid:
        target.gid = attr.st_gid
    if fields.update_mtime:
        target.time_ns = attr.st_mtime_ns


@dataclass(eq=False, kw_only=True)
class Node(Attributes):
    """One file: its handle, its attributes, and who still holds it."""

    inode: int
    handle: Handle
    name: bytes | None
    opens: int = 0
    lookups: int = 0
    freed: bool = False


async def open_scratch_dir(
    name: str, device: BlockDevice, unit: int, index: int, kind: str, spec: str
) -> ScratchDir:
    """The ``index``-th scratch directory of a mount; closes ``device`` if it is unusable."""
    try:
        swap = await open_swap(device, unit)
        if swap.capacity_bytes == 0:
            size = (await device.get_info()).size_bytes
            raise Unsafe(
                f"the device is smaller than one {format_size(unit)} unit; a smaller "
                f"--scratch-unit (e.g. --scratch-unit {format_spec_size(smaller_unit(size))}) "
                f"fits it"
            )
    except BaseException:
        await device.aclose()
        raise
    return ScratchDir(name, swap, (index + 1) * INODE_SPAN, kind=kind, spec=spec)


def smaller_unit(size_bytes: int) -> int:
    """A unit for a device of ``size_bytes`` too small for the one asked: a power of two,
    at most a sixteenth of the device (at least 512 bytes)."""
    unit = 512
    while unit * 2 * 16 <= size_bytes:
        unit *= 2
    return unit


class ScratchDir:
    def __init__(self, name: str, swap: Swap, base: int, *, kind: str, spec: str) -> None:
        self.name = name
        self.swap = swap
        self.inode = base
        self.kind = kind
        self.spec = spec
        self._names: dict[bytes, Node] = {}
        self._nodes: dict[int, Node] = {}
        self._next_inode = base + 1
        self._dir = Attributes(stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), time.time_ns())
        """The directory's own attributes, which chmod, chown and touch change."""

    def owns(self, number: int) -> bool:
        return self.inode <= number < self.inode + INODE_SPAN

    @property
    def file_count(self) -> int:
        """Files that hold space: named ones, and unlinked ones still open."""
        return sum(not node.freed for node in self._nodes.values())

    async def aclose(self) -> None:
        await self.swap.device.aclose()

    # --- nodes -------------------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise fail(errno.ENOENT) from None

    def _named(self, parent: int, name: bytes) -> Node:
        self._check_parent(parent)
        check_name(name)
        try:
            return self._names[name]
        except KeyError:
            raise fail(errno.ENOENT) from None

    def _check_parent(self, parent: int) -> None:
        if parent != self.inode:
            raise fail(errno.ENOTDIR)

    def _check_new_name(self, parent: int, name: bytes) -> None:
        self._check_parent(parent)
        check_name(name)
        if name in self._names:
            raise fail(errno.EEXIST)

    async def _new_node(self, name: bytes, mode: int, ctx: Any) -> Node:
        handle = await self.swap.empty()
        if name in self._names:  # created by another request meanwhile
            raise fail(errno.EEXIST)
        node = Node(
            inode=self._next_inode,
            handle=handle,
            mode=stat.S_IFREG | (mode & 0o7777),
            uid=ctx.uid,
            gid=ctx.gid,
            time_ns=time.time_ns(),
            name=name,
            lookups=1,
        )
        self._next_inode += 1
        self._nodes[node.inode] = node
        self._names[name] = node
        return node

    def _unname(self, node: Node) -> None:
        del self._names[node.name or b""]
        node.name = None

    async def _free_if_gone(self, node: Node) -> None:
        """Free the space of a file that has no name, no open file, and that the kernel
        has forgotten: until then it may still open it (a path looked up before an
        unlink or a rename over it), and must find the old contents, as on ext4."""
        if node.name is None and node.opens == 0 and node.lookups <= 0 and not node.freed:
            node.freed = True
            await self.swap.free(node.handle)
        self._forget_if_unused(node)

    def _forget_if_unused(self, node: Node) -> None:
        if node.freed and node.lookups <= 0:
            self._nodes.pop(node.inode, None)

    # --- attributes ----------------------------------------------------------------------

    async def _node_attr(self, node: Node) -> pyfuse3.EntryAttributes:
        size = 0 if node.freed else await self.swap.size(node.handle)
        attr = entry_attributes(node.inode, node.mode, size, node.time_ns)
        attr.st_uid, attr.st_gid = node.uid, node.gid
        attr.st_nlink = 0 if node.name is None else 1
        attr.st_blocks = 0 if node.freed else self.swap.allocated_bytes(node.handle) // 512
        return attr

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if inode == self.inode:
            d = self._dir
            attr = entry_attributes(inode, d.mode, 0, d.time_ns)
            attr.st_uid, attr.st_gid = d.uid, d.gid
            return attr
        return await self._node_attr(self._node(inode))

    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: Any, fh: Any, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        if inode == self.inode:
            if fields.update_size:
                raise fail(errno.EISDIR)
            set_attributes(self._dir, attr, fields)
            return await self.getattr(inode)
        node = self._node(inode)
        if fields.update_size:
            await self.swap.truncate(node.handle, attr.st_size)
        set_attributes(node, attr, fields)
        if not fields.update_mtime and fields.update_size:
            node.time_ns = time.time_ns()
        return await self._node_attr(node)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        node = self._named(parent_inode, name)
        node.lookups += 1
        return await self._node_attr(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            node = self._nodes.get(inode)
            if node is not None:
                node.lookups -= count
                await self._free_if_gone(node)

    # --- the directory -------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: Any) -> int:
        self._check_parent(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Entries in inode order; ``next_id`` is the inode after, so changes skip nothing."""
        for node in sorted(self._names.values(), key=lambda n: n.inode):
            if node.inode < start_id or node.name is None:
                continue
            if not pyfuse3.readdir_reply(
                token, node.name, await self._node_attr(node), node.inode + 1
            ):
                break
            node.lookups += 1

    async def releasedir(self, fh: int) -> None:
        pass

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_new_name(parent_inode, name)
        node = await self._new_node(name, mode, ctx)
        node.opens += 1
        return pyfuse3.FileInfo(fh=node.inode, direct_io=True), await self._node_attr(node)

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        self._check_new_name(parent_inode, name)
        if not stat.S_ISREG(mode):
            raise fail(errno.EPERM)
        return await self._node_attr(await self._new_node(name, mode, ctx))

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        self._check_new_name(parent_inode, name)
        raise fail(errno.EPERM)

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        self._check_new_name(parent_inode, name)
        raise fail(errno.EPERM)

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        raise fail(errno.EPERM)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        node = self._named(parent_inode, name)
        self._unname(node)
        await self._free_if_gone(node)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._named(parent_inode, name)
        raise fail(errno.ENOTDIR)

    async def rename(
        self, parent_old: int, old: bytes, parent_new: int, new: bytes, flags: int, ctx: Any
    ) -> None:
        node = self._named(parent_old, old)
        if parent_new != self.inode:
            raise fail(errno.EXDEV)
        check_name(new)
        target = self._names.get(new)
        if flags & ~(pyfuse3.RENAME_EXCHANGE | pyfuse3.RENAME_NOREPLACE):
            raise fail(errno.EINVAL)  # RENAME_WHITEOUT: no whiteouts here
        if flags & pyfuse3.RENAME_EXCHANGE:
            return self._exchange(node, target)
        if target is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise fail(errno.EEXIST)
        if target is node:
            return None
        if target is not None:
            self._unname(target)
        self._unname(node)
        node.name = new
        self._names[new] = node
        if target is not None:
            await self._free_if_gone(target)
        return None

    def _exchange(self, node: Node, target: Node | None) -> None:
        if target is None:
            raise fail(errno.ENOENT)
        assert node.name is not None and target.name is not None
        node.name, target.name = target.name, node.name
        self._names[node.name], self._names[target.name] = node, target

    # --- file I/O --------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode == self.inode:
            raise fail(errno.EISDIR)
        node = self._node(inode)
        if flags & os.O_TRUNC:  # libfuse asks for atomic O_TRUNC: no setattr comes first
            await self.swap.truncate(node.handle, 0)
            node.time_ns = time.time_ns()
        node.opens += 1
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.swap.get_partial(self._node(fh).handle, off, size)  # type: ignore[return-value]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self._node(fh)
        await self.swap.write(node.handle, off, buf)
        node.time_ns = time.time_ns()
        return len(buf)

    async def fsync(self, fh: int, datasync: bool) -> None:
        """Nothing here outlives the mount, so there is nothing to make durable."""

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        node = self._node(fh)
        node.opens -= 1
        await self._free_if_gone(node)

    # --- extended attributes: none ------------------------------------------------------

    async def listxattr(self, inode: int, ctx: Any) -> Sequence[bytes]:
        return []

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        raise fail(pyfuse3.ENOATTR)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        raise fail(errno.EOPNOTSUPP)

    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        raise fail(pyfuse3.ENOATTR)
