"""trio glue for NBD: it only moves bytes between sockets and the sans-io cores.

The client: ``client.py`` (one connection), ``connect.py`` (the entry points),
``reconnect.py``, ``sender.py``, ``watchdog.py``, ``tls.py``.  The server: ``server.py``
(accepting, shutdown), ``connection.py`` (one client), ``budget.py`` (what clients may
make it hold), ``writer.py`` (its replies), ``tlsserver.py`` (its TLS).
"""

from .client import NBDClient
from .connect import connect_nbd, list_exports, open_nbd_client, wrap_nbd_stream
from .connection import Backend, ExportTable, Handler, Limits
from .handshake import ConnectionLost, HandshakeRefused
from .server import NBDServer

__all__ = [
    "Backend",
    "ConnectionLost",
    "ExportTable",
    "Handler",
    "HandshakeRefused",
    "Limits",
    "NBDClient",
    "NBDServer",
    "connect_nbd",
    "list_exports",
    "open_nbd_client",
    "wrap_nbd_stream",
]
