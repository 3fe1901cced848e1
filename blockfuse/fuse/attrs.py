"""What the flat files and the scratch directories share: attribute constants and builder."""

from __future__ import annotations

import os
import stat

import pyfuse3

from ..units import ceil_div

XATTR_PREFIX = "user.blockfuse."
ATTR_TIMEOUT = 1.0
IO_SIZE_HINT = 128 << 10
"""``st_blksize``: tools such as ``cmp`` read in pieces this size (with 4 KiB, reading a
2 GiB scratch file back took 5x as long as writing it)."""


def entry_attributes(inode: int, mode: int, size: int, time_ns: int) -> pyfuse3.EntryAttributes:
    """Attributes of an entry owned by the mount's user, ``size`` bytes long."""
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = inode
    attr.st_mode = mode
    attr.st_nlink = 2 if stat.S_ISDIR(mode) else 1
    attr.st_uid, attr.st_gid = os.getuid(), os.getgid()
    attr.st_size = size
    attr.st_blksize = IO_SIZE_HINT
    attr.st_blocks = ceil_div(size, 512)
    attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = time_ns
    attr.attr_timeout = attr.entry_timeout = ATTR_TIMEOUT
    return attr
