"""The error vocabulary of blockfuse.

Every error a device may raise is a ``BlockError``; each carries the errno that the FUSE
and NBD edges answer with.  The split follows whose fault it is and how much is broken:

- ``Unsafe``: the caller broke a precondition (misaligned buffer, out of range); nothing
  was touched.  Fix the caller.
- ``ReadOnly``: a write to a read-only device; nothing was written.
- ``Unimplemented``: the device lacks the capability; nothing was done.
- ``Disconnected``: the device was closed by its owner; later I/O fails.
- ``RequestFailed``: the backend refused or failed this one request (an OSError from a
  file, an NBD error reply); the device lives on.
- ``ProtocolError``: the peer broke the NBD protocol; the connection is dropped.
- ``NoSpace``: swapfs has no free units left for a write; the file is unchanged.
- ``HandleFreed``: a swapfs handle was used after ``free``; nothing was touched.

``map_os_errors`` is the one place where foreign ``OSError``s become ours.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager


class BlockError(Exception):
    """Base of every device error; ``errno`` is what the FUSE and NBD edges answer."""

    errno: int = errno.EIO


class Unsafe(BlockError):
    """A request broke the block contract (alignment, range); nothing was touched."""

    errno = errno.EINVAL


class ReadOnly(BlockError):
    """A write to a read-only device; nothing was written."""

    errno = errno.EROFS


class Unimplemented(BlockError):
    """The device does not offer this capability; nothing was done."""

    errno = errno.EOPNOTSUPP


class Disconnected(BlockError):
    """The device was closed (``aclose``); no more I/O is possible on it."""

    errno = errno.ESHUTDOWN


class ProtocolError(BlockError):
    """The peer broke the NBD protocol; the connection has been dropped."""

    errno = errno.EIO


class RequestFailed(BlockError):
    """The backend failed this one request with ``errno``; the device lives on."""

    def __init__(self, err: int, message: str = "") -> None:
        self.errno = err
        super().__init__(message or os.strerror(err))


class Unreachable(RequestFailed):
    """The request could not reach the device (its connection stayed down through every
    retry): it failed with EIO, but nothing says that anything done before was lost."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


class NoSpace(BlockError):
    """swapfs cannot find the space a write needs; the handle is unchanged."""

    errno = errno.ENOSPC


class HandleFreed(BlockError):
    """A swapfs handle was used after ``free``; nothing was read or written."""

    errno = errno.EBADF


@contextmanager
def map_os_errors(what: str) -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into ``RequestFailed`` naming ``what``."""
    try:
        yield
    except OSError as exc:
        raise request_failed(exc, what) from exc


def request_failed(exc: OSError, what: str) -> RequestFailed:
    """``exc`` as the ``RequestFailed`` to raise (``from exc``), naming ``what``.

    For hot paths that catch ``OSError`` themselves rather than pay for
    ``map_os_errors``'s generator on every call."""
    err = exc.errno or errno.EIO
    return RequestFailed(err, f"{what}: {os.strerror(err)}")
