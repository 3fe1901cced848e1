"""What an image file must be before a ``file`` or ``sparse`` device opens it.

- **Raw.**  A qcow2, VMDK, VHDX, QED, VDI or VHD image is not a disk but a format that
  describes one: served as it is, its headers would show as the disk's first bytes and
  writes would corrupt it.  Such an image is refused (``check_raw``) with the way to use
  it instead, unless the caller says ``format="raw"`` (e.g. a raw disk that happens to
  begin with those bytes).
- **A whole number of sectors, and at least one.**  ``mem(0)``, a ``truncate -s 0`` of a
  flat file and a 0-byte image are refused alike (``check_openable``).
- **Not written by another device** (``lock_image``): an exclusive ``flock`` while it is
  open for writing; read-only opens take none.  A refusal names the process that holds
  the lock: most often a blockfuse still flushing and closing its devices after a plain
  ``umount`` (which, unlike ``blockfuse umount``, does not wait for that).
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


# --- formats ---------------------------------------------------------------------------

IMAGE_MAGICS = (
    ("qcow2", 0, b"QFI\xfb"),  # qcow (version 1) too: see image_format
    ("qed", 0, b"QED\x00"),
    ("vmdk", 0, b"KDMV"),
    ("vmdk", 0, b"# Disk DescriptorFile"),
    ("vhdx", 0, b"vhdxfile"),
    ("vpc", 0, b"conectix"),  # a dynamic VHD (a fixed one is raw data and a footer)
    ("vdi", 0x40, b"\x7f\x10\xda\xbe"),
)
"""``(qemu's format name, offset, magic)`` of image formats that are not raw disks; qemu-img
writes each of them with its magic at the start (VDI: at byte 64)."""
IMAGE_HEAD = 512
"""How many bytes of an image ``image_format`` looks at."""
FORMAT_NAMES = {"qcow": "qcow", "qcow2": "qcow2", "qed": "QED", "vmdk": "VMDK",
                "vhdx": "VHDX", "vpc": "VHD", "vdi": "VDI"}  # fmt: skip


def image_format(head: bytes) -> str | None:
    """qemu's name of the format whose magic ``head`` (an image's first bytes) holds
    (``"qcow2"``, ``"vmdk"``, ...), or ``None`` for anything else: raw."""
    for name, offset, magic in IMAGE_MAGICS:
        if head[offset : offset + len(magic)] == magic:
            if name == "qcow2" and head[4:8] == b"\0\0\0\x01":
                return "qcow"
            return name
    return None


def not_raw(path: str, name: str) -> str:
    """Why ``path``, an image of format ``name``, is refused, and what to do instead."""
    stem = os.path.splitext(path)[0]
    sock = os.path.abspath(stem) + ".sock"  # qemu-nbd wants an absolute socket path
    return (
        f"{path} is a {FORMAT_NAMES.get(name, name)} image, not a raw disk: serve it with "
        f"`qemu-nbd -t -f {name} -k {sock} {path}` and use nbd+unix:///?socket={sock}, "
        f"or convert it with `qemu-img convert -O raw {path} {stem}.raw` "
        f"(file({path}, format=raw) would use its bytes as they are)"
    )


def check_format(format: str | None) -> None:
    """Raise ``ValueError`` unless blockfuse reads ``format``: ``"raw"``, or ``None`` (look)."""
    if format not in (None, "raw"):
        raise ValueError(
            f"format={format}: blockfuse reads raw images only (format=raw); serve other "
            f"formats with qemu-nbd and use its nbd+unix:// URI"
        )


def check_head(head: bytes, path: str, format: str | None) -> None:
    """Raise ``ValueError`` if ``head``, the first bytes of ``path``, holds another image
    format's magic, unless ``format`` says raw."""
    check_format(format)
    name = None if format == "raw" else image_format(head)
    if name is not None:
        raise ValueError(not_raw(path, name))


def check_raw(fd: int, path: str, format: str | None) -> None:
    """``check_head`` of the image open as ``fd``."""
    check_head(b"" if format == "raw" else os.pread(fd, IMAGE_HEAD, 0), path, format)


# --- size ------------------------------------------------------------------------------


def check_openable(fd: int, path: str) -> None:
    """Raise ``ValueError`` unless ``fd`` is a regular file or block device of a whole,
    non-zero number of sectors."""
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ValueError(f"{path} is not a regular file or block device")
    size, sector_size = device_geometry(fd)
    if size == 0:
        raise ValueError(empty_image(path, stat.S_ISBLK(st.st_mode)))
    if size % sector_size:
        raise ValueError(
            f"{path} is {size} bytes, not a whole number of {sector_size}-byte sectors "
            f"(use sparse({path}) or `truncate -s` it to a multiple of {sector_size})"
        )


def empty_image(path: str, is_block: bool = False) -> str:
    """Why an image (or block device) of 0 bytes is refused."""
    if is_block:
        return f"{path} is a block device of 0 bytes (an unattached loop device?)"
    return (
        f"{path} is empty (0 bytes), and a device needs at least one sector: give it a "
        f"size (`truncate -s 1G {path}`) or use sparse({path}, size=1G)"
    )


# --- the lock --------------------------------------------------------------------------


def lock_image(fd: int, path: str, *, read_only: bool) -> None:
    """Take an exclusive ``flock`` on an image opened to be written.

    Two devices writing one image (two mounts, or ``a=sparse(x.img) b=x.img`` in one)
    would corrupt whatever filesystem it holds; a read-only device takes no lock (a
    read-only view of a disk in use is the user's own choice).  The lock ends with the
    descriptor, so a killed blockfuse leaves none behind.  Raises ``ValueError`` naming
    the process that holds it (``locked``).
    """
    if read_only:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(locked(path, lock_holder(fd))) from None


def lock_holder(fd: int) -> int | None:
    """The PID that holds a ``flock`` on the file open as ``fd``, or ``None`` if unknown.

    /proc/locks lists each lock as ``N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF``
    (the device numbers in hex), the PID being the process that took it."""
    st = os.fstat(fd)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()  # a waiter's line has "->" after the number: skipped
        if fields[1:2] == ["FLOCK"] and fields[5:6] == [where] and fields[4].isdigit():
            return int(fields[4])
    return None


def locked(path: str, holder: int | None) -> str:
    """Why ``path`` cannot be opened for writing: process ``holder`` (if known) has it."""
    if holder is None or holder == os.getpid():
        return (
            f"{path} is already open for writing by another blockfuse device (in this "
            f"mount or another); use it in one device only (a device that only reads it "
            f"can be file({path}, ro=true))"
        )
    argv = command_line(holder)
    command = blockfuse_command(argv)
    if command is None:
        shown = " ".join(argv) or "?"
        return f"{path} is locked (flock) by another program, pid {holder} ({shown})"
    if command != "mount":
        return f"{path} is in use by `blockfuse {command}` (pid {holder}); stop it first"
    mountpoint = blockfuse_mountpoint(holder)
    if mountpoint is not None:
        return (
            f"{path} is in use by the blockfuse mount at {mountpoint} (pid {holder}); "
            f"stop it first: blockfuse umount {mountpoint}"
        )
    return (
        f"{path} is still open in blockfuse pid {holder}, which is unmounted and still "
        f"flushing and closing its devices: wait for it to exit (`blockfuse umount "
        f"MOUNTPOINT`, unlike a plain umount, returns only once that is done)"
    )


def command_line(pid: int) -> list[str]:
    """``pid``'s argv (empty if it is gone or hidden)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def blockfuse_command(argv: list[str]) -> str | None:
    """The subcommand of a blockfuse command line (``"mount"``; ``""`` if none shows),
    or ``None`` if ``argv`` is not blockfuse's (``blockfuse ...``, ``python -m
    blockfuse.cli ...``)."""
    for index, arg in enumerate(argv[:3]):
        if os.path.basename(arg).startswith("blockfuse"):
            rest = [a for a in argv[index + 1 :] if not a.startswith("-")]
            return rest[0] if rest else ""
    return None


def blockfuse_mountpoint(pid: int) -> str | None:
    """Where blockfuse ``pid`` is mounted: the mount whose source is ``blockfuse:PID``
    (the fsname ``fuse/mount.py`` gives it), from /proc/self/mountinfo."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "-" in fields and fields[fields.index("-") + 2 :][:1] == [f"blockfuse:{pid}"]:
            return fields[4].replace("\\040", " ")
    return None
