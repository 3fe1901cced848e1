"""trio glue for NBD: it only moves bytes between sockets and the sans-io core."""

from .client import NBDClient
from .connect import connect_nbd, list_exports, open_nbd_client, wrap_nbd_stream
from .handshake import ConnectionLost, HandshakeRefused

__all__ = [
    "ConnectionLost",
    "HandshakeRefused",
    "NBDClient",
    "connect_nbd",
    "list_exports",
    "open_nbd_client",
    "wrap_nbd_stream",
]
