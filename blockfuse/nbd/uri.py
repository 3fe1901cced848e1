"""NBD URIs (``doc/uri.md``): ``nbd://HOST[:PORT]/EXPORT`` and ``nbd+unix:///EXPORT?socket=PATH``."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from .constants import DEFAULT_PORT

SCHEMES = ("nbd", "nbd+unix")


class BadURI(ValueError):
    """Not a usable NBD URI; the message says what is wrong."""


@dataclass(frozen=True)
class Address:
    """Where an export lives: a TCP host and port, or a Unix socket; and its name."""

    export: str = ""
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None

    @property
    def server(self) -> str:
        """The server for messages: ``host:port`` or ``unix:PATH``."""
        return f"unix:{self.socket}" if self.socket else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        export = urllib.parse.quote(self.export)
        if self.socket:
            return f"nbd+unix:///{export}?socket={self.socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{export}"


def parse_uri(text: str) -> Address:
    """Parse an NBD URI; raises ``BadURI`` (its message does not repeat the URI).  TLS
    schemes (``nbds``) are refused."""
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError as exc:  # e.g. "Invalid IPv6 URL"
        raise BadURI(f"not an NBD URI: {exc}") from None
    if parts.scheme in ("nbds", "nbds+unix", "nbd+vsock", "nbds+vsock"):
        raise BadURI(f"{parts.scheme}:// is not supported (use nbd:// or nbd+unix://)")
    if parts.scheme not in SCHEMES:
        raise BadURI("not an NBD URI (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)")
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = urllib.parse.parse_qs(parts.query)
    if parts.scheme == "nbd+unix":
        return _unix(text, parts, export, query)
    return _tcp(text, parts, export, query)


def _unix(text: str, parts: urllib.parse.SplitResult, export: str, query: dict) -> Address:  # type: ignore[type-arg]
    if parts.netloc:
        raise BadURI("nbd+unix:// takes no host (write nbd+unix:///EXPORT?socket=PATH)")
    sockets = query.get("socket", [])
    if len(sockets) != 1 or not sockets[0]:
        raise BadURI("nbd+unix:// needs exactly one ?socket=PATH")
    return Address(export, socket=sockets[0])


def _tcp(text: str, parts: urllib.parse.SplitResult, export: str, query: dict) -> Address:  # type: ignore[type-arg]
    if query:
        raise BadURI("nbd:// takes no query parameters")
    if not parts.hostname:
        raise BadURI("nbd:// needs a host")
    try:
        port = DEFAULT_PORT if parts.port is None else parts.port
    except ValueError as exc:
        raise BadURI(f"bad port ({exc})") from None
    if port == 0:
        raise BadURI("bad port 0 (leave the port out for 10809)")
    return Address(export, host=parts.hostname, port=port)
