"""pyfuse3 Operations: a root directory holding one flat file per device.

The root may also hold scratch directories (``blockfuse.fuse.scratch``); each owns a
range of inode numbers, and ``routed`` hands every request about one of its inodes or
file handles to it.

Only ``FUSEError`` may leave a handler (anything else takes the mount down), so every
handler runs under ``fuse_errors``: our ``BlockError``s become their errno, anything
unexpected is logged and becomes EIO.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import pyfuse3

from ..errors import BlockError
from ..units import ceil_div
from .flatfile import FlatFile

if TYPE_CHECKING:
    from .scratch import ScratchDir

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

XATTR_PREFIX = "user.blockfuse."
ATTR_TIMEOUT = 1.0
IO_SIZE_HINT = 128 << 10
"""``st_blksize``: tools such as ``cmp`` read in pieces this size (with 4 KiB, reading a
2 GiB scratch file back took 5x as long as writing it)."""


def fuse_errors(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Let only ``FUSEError`` out of a handler."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except BlockError as exc:
            log.debug("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from exc
        except Exception as exc:
            log.exception("unexpected error in FUSE handler %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from exc

    return wrapper


Handler = Callable[Concatenate["BlockFS", int, P], Coroutine[Any, Any, R]]


def routed(fn: Handler[P, R]) -> Handler[P, R]:
    """Hand a request whose first number is a scratch directory's to that directory."""

    @functools.wraps(fn)
    async def wrapper(self: BlockFS, number: int, /, *args: P.args, **kwargs: P.kwargs) -> R:
        subtree = self._subtree(number)
        if subtree is None:
            return await fn(self, number, *args, **kwargs)
        handler: Callable[..., Coroutine[Any, Any, R]] = getattr(subtree, fn.__name__)
        return await handler(number, *args, **kwargs)

    return wrapper


class BlockFS(pyfuse3.Operations):
    def __init__(
        self,
        files: Sequence[FlatFile],
        *,
        read_only: bool = False,
        scratch: Sequence[ScratchDir] = (),
    ) -> None:
        super().__init__()
        self._by_inode = {pyfuse3.ROOT_INODE + 1 + i: f for i, f in enumerate(files)}
        self._by_name = {f.name.encode(): ino for ino, f in self._by_inode.items()}
        self._scratch = {d.name.encode(): d for d in scratch}
        self._scratch_dirs = tuple(scratch)
        self._read_only = read_only
        self._started_ns = time.time_ns()

    def _subtree(self, number: int) -> ScratchDir | None:
        for directory in self._scratch_dirs:  # a loop, not next(genexpr): every request asks
            if directory.owns(number):
                return directory
        return None

    def _file(self, inode: int) -> FlatFile:
        try:
            return self._by_inode[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    # --- names and attributes -------------------------------------------------------

    def _base_attr(self, inode: int, mode: int, size: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mode = mode
        attr.st_nlink = 1
        attr.st_uid, attr.st_gid = os.getuid(), os.getgid()
        attr.st_size = size
        attr.st_blksize = IO_SIZE_HINT
        attr.st_blocks = ceil_div(size, 512)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._started_ns
        attr.attr_timeout = attr.entry_timeout = ATTR_TIMEOUT
        return attr

    @routed
    @fuse_errors
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE:
            return self._base_attr(inode, stat.S_IFDIR | 0o755, 0)
        f = self._file(inode)
        info = await f.info()
        writable = info.read_write and not self._read_only
        mode = stat.S_IFREG | (0o644 if writable else 0o444)
        attr = self._base_attr(inode, mode, info.size_bytes)
        allocated = f.status().get("allocated")  # a sparse image: what it holds on disk
        if allocated is not None:
            attr.st_blocks = ceil_div(int(allocated), 512)
        return attr

    @routed
    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name in self._scratch:
            scratch = self._scratch[name]
            return await scratch.getattr(scratch.inode)
        if parent_inode != pyfuse3.ROOT_INODE or name not in self._by_name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(self._by_name[name])

    @routed
    @fuse_errors
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: Any, fh: Any, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            if self._read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            await self._file(inode).resize(attr.st_size)
        return await self.getattr(inode)

    @routed
    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @routed
    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = [(self._by_inode[ino].name.encode(), ino) for ino in sorted(self._by_inode)]
        entries += [(name, d.inode) for name, d in self._scratch.items()]
        for index in range(start_id, len(entries)):
            name, inode = entries[index]
            if not pyfuse3.readdir_reply(token, name, await self.getattr(inode), index + 1):
                break

    @fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        """One answer for the whole mount (pyfuse3 does not say which inode was asked).

        With scratch directories, their devices' capacity and free space (what ``df``
        on a scratch directory should show; the flat files have no free space to
        speak of); without, the flat files' total size, all used.
        """
        free = sum(d.swap.free_bytes for d in self._scratch.values())
        total = sum(d.swap.capacity_bytes for d in self._scratch.values())
        if not self._scratch:
            for f in self._by_inode.values():
                total += (await f.info()).size_bytes
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = total // 4096
        data.f_bfree = data.f_bavail = free // 4096
        new_files = sum(d.swap.free_bytes // d.swap.unit_size for d in self._scratch.values())
        used = 1 + len(self._by_inode) + sum(1 + d.file_count for d in self._scratch_dirs)
        data.f_files = used + new_files
        data.f_ffree = data.f_favail = new_files
        data.f_namemax = 255
        return data

    # --- file I/O ----------------------------------------------------------------------

    @routed
    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        """Open with ``direct_io``: every read and write reaches the device, no page cache.

        Measured with fio (4K random writes, depth 16): without direct_io the kernel
        asks for the ``security.capability`` xattr before every write (file_remove_privs,
        under the inode lock), a second round trip that halved write IOPS.  With
        direct_io it does not, and requests keep their size (up to 1 MiB).
        """
        f = self._file(inode)
        if flags & (os.O_WRONLY | os.O_RDWR):
            info = await f.info()
            if self._read_only or not info.read_write:
                raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    @routed
    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        # pyfuse3 takes any contiguous buffer; a memoryview saves a copy of the data.
        return await self._file(fh).read(off, size)  # type: ignore[return-value]

    @routed
    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._file(fh).write(off, buf)

    @routed
    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._file(fh).flush()

    @routed
    async def flush(self, fh: int) -> None:
        """close(2): data already reached the device; durability is ``fsync``'s job."""

    @routed
    async def release(self, fh: int) -> None:
        pass

    # --- names: only scratch directories hold files that come and go ---------------------

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for scratch in self._scratch.values():
            mine = [(ino, n) for ino, n in inode_list if scratch.owns(ino)]
            if mine:
                await scratch.forget(mine)

    @routed
    async def releasedir(self, fh: int) -> None:
        pass

    @routed
    async def rename(
        self, parent_old: int, old: bytes, parent_new: int, new: bytes, flags: int, ctx: Any
    ) -> None:
        if self._subtree(parent_new) is not None:
            raise pyfuse3.FUSEError(errno.EXDEV)
        raise pyfuse3.FUSEError(errno.EPERM)

    # The root's own entries are fixed: what would add or remove one is not permitted.

    @routed
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EPERM)

    @routed
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @routed
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @routed
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @routed
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @routed
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    @routed
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    # --- status as extended attributes ----------------------------------------------------

    async def _xattrs(self, inode: int) -> dict[str, str]:
        f = self._file(inode)
        info = await f.info()
        values = {
            "kind": f.kind,
            "spec": f.spec,
            "size": str(info.size_bytes),
            "sector_size": str(info.sector_size),
            "read_only": "yes" if (self._read_only or not info.read_write) else "no",
        }
        values.update(f.status())
        return values

    @routed
    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> Sequence[bytes]:
        if inode == pyfuse3.ROOT_INODE:
            return []
        return [(XATTR_PREFIX + key).encode() for key in await self._xattrs(inode)]

    @routed
    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        key = name.decode(errors="replace")
        if inode == pyfuse3.ROOT_INODE or not key.startswith(XATTR_PREFIX):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        values = await self._xattrs(inode)
        try:
            return values[key[len(XATTR_PREFIX) :]].encode()
        except KeyError:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None

    @routed
    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        """Writing ``user.blockfuse.KEY`` asks the device to act (e.g. a mirror's ``pivot``)."""
        key = name.decode(errors="replace")
        if inode == pyfuse3.ROOT_INODE or not key.startswith(XATTR_PREFIX):
            raise pyfuse3.FUSEError(errno.EPERM)
        await self._file(inode).control(key[len(XATTR_PREFIX) :], value)

    @routed
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)
