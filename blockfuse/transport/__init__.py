"""trio glue for NBD: it only moves bytes between sockets and the sans-io core."""

from .client import (
    ConnectionLost,
    HandshakeRefused,
    NBDClient,
    connect_nbd,
    list_exports,
    open_nbd_client,
    wrap_nbd_stream,
)

__all__ = [
    "ConnectionLost",
    "HandshakeRefused",
    "NBDClient",
    "connect_nbd",
    "list_exports",
    "open_nbd_client",
    "wrap_nbd_stream",
]
