"""A range of an open file, sent from the file itself instead of through a buffer.

The NBD server answers a large READ of a file device with one (``FileDevice.lend``); its
writer sends it with ``os.sendfile`` (``transport/writer.py``).  No I/O here: the
sans-io protocol core names the type in its replies.
"""

from __future__ import annotations

from collections.abc import Callable


class FileRange:
    """``length`` bytes of an open file from byte ``offset``, to be sent from the file
    itself (``os.sendfile``) instead of being read into a buffer first.

    The device that lent it keeps ``fd`` open until ``release`` (once, when the range has
    been sent or never will be); ``failed`` tells it that reading the file for a send
    failed, or that the file takes no splice into it (it lends no more such ranges then,
    so the next request is a plain one, which can answer with the error).  ``len()``
    is the byte count, as for a buffer."""

    __slots__ = ("blocked", "failed", "fd", "length", "offset", "release")

    def __init__(
        self,
        fd: int,
        offset: int,
        length: int,
        release: Callable[[], None],
        failed: Callable[[OSError], None],
    ) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length
        self.release = release
        self.failed = failed
        self.blocked: Callable[[], None] = _nothing
        """Told by a writer into the range that a write blocked in the kernel (the
        lender then sends its writes to threads for a while)."""

    def __len__(self) -> int:
        return self.length

    def piece(self, at: int, n: int) -> FileRange:
        """``n`` bytes of it from byte ``at`` of the range (the same lender's)."""
        return FileRange(self.fd, self.offset + at, n, self.release, self.failed)

    def after(self, n: int) -> FileRange:
        """What is left once the first ``n`` bytes have been sent."""
        return self.piece(n, self.length - n)


def _nothing() -> None:
    pass
