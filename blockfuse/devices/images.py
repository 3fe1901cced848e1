"""What an image file must be before a ``file`` or ``sparse`` device opens it.

- **A whole number of sectors** (``check_openable``).
- **Not written by another device** (``lock_image``): an exclusive ``flock`` while it is
  open for writing; read-only opens take none.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct

from ..block import SECTOR_SIZE

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268


def device_geometry(fd: int) -> tuple[int, int]:
    """``(size_bytes, sector_size)`` of an open regular file or block device."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
        sector_size = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
        return size, sector_size
    return st.st_size, SECTOR_SIZE


def check_openable(fd: int, path: str) -> None:
    """Raise ``ValueError`` unless ``fd`` is a regular file or block device of a whole
    number of sectors."""
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ValueError(f"{path} is not a regular file or block device")
    size, sector_size = device_geometry(fd)
    if size % sector_size:
        raise ValueError(
            f"{path} is {size} bytes, not a whole number of {sector_size}-byte sectors "
            f"(use sparse({path}) or `truncate -s` it to a multiple of {sector_size})"
        )


def lock_image(fd: int, path: str, *, read_only: bool) -> None:
    """Take an exclusive ``flock`` on an image opened to be written.

    Two devices writing one image (two mounts, or ``a=sparse(x.img) b=x.img`` in one)
    would corrupt whatever filesystem it holds; a read-only device takes no lock (a
    read-only view of a disk in use is the user's own choice).  The lock ends with the
    descriptor, so a killed blockfuse leaves none behind.  Raises ``ValueError``.
    """
    if read_only:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(
            f"{path} is already open for writing by another blockfuse device (in this "
            f"mount or another); use it in one device only (a device that only reads it "
            f"can be file({path}, ro=true))"
        ) from None
