"""NBD URIs (``doc/uri.md``, libnbd's ``nbd_connect_uri``).

    nbd://HOST[:PORT]/EXPORT                nbd+unix:///EXPORT?socket=PATH
    nbds://HOST[:PORT]/EXPORT[?TLS]         nbds+unix:///EXPORT?socket=PATH[&TLS]

``nbds`` means TLS or nothing: the connection fails rather than fall back to plaintext.
The TLS query parameters: ``tls-certificates=DIR`` (``ca-cert.pem``, ``client-cert.pem``,
``client-key.pem``, the layout nbdkit, qemu and libnbd use), ``tls-verify-peer=false``
(no verification: warned), ``tls-hostname=NAME`` (the name the server's certificate must
carry), ``tls-type=x509``.  Without them: the system's CA store, and the URI's host name
(over a Unix socket there is none, so only the chain is verified unless
``tls-hostname`` is given, as libnbd and qemu do).  Any other parameter is refused.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from .constants import DEFAULT_PORT

SCHEMES = ("nbd", "nbd+unix", "nbds", "nbds+unix")
SCHEMES_SPOKEN = ("nbd", "nbds", "nbd+unix", "nbds+unix")
"""``SCHEMES`` in the order messages list them."""
TLS_PARAMETERS = ("tls-certificates", "tls-verify-peer", "tls-hostname", "tls-type")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class BadURI(ValueError):
    """Not a usable NBD URI; the message says what is wrong."""


@dataclass(frozen=True)
class TLSOptions:
    """How to speak TLS to the server (``nbds``); the fields are the URI's parameters."""

    certificates: str | None = None
    """A directory with ``ca-cert.pem`` and, for a client certificate, ``client-cert.pem``
    and ``client-key.pem``; ``None``: the system's CA store, no client certificate."""
    verify_peer: bool = True
    hostname: str | None = None
    """The name the server's certificate must carry; ``None``: the URI's host."""


@dataclass(frozen=True)
class Address:
    """Where an export lives: a TCP host and port, or a Unix socket; and its name.
    ``tls`` is set for ``nbds`` URIs."""

    export: str = ""
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None
    tls: TLSOptions | None = None

    @property
    def server(self) -> str:
        """The server for messages: ``host:port`` or ``unix:PATH``."""
        return f"unix:{self.socket}" if self.socket else f"{self.host}:{self.port}"

    @property
    def tls_hostname(self) -> str | None:
        """The server's name for TLS (SNI) and, when verifying, for its certificate:
        ``tls-hostname``, else the host (``None`` over a Unix socket: no name)."""
        if self.tls is None:
            return None
        return self.tls.hostname or self.host

    def __str__(self) -> str:
        export = urllib.parse.quote(self.export)
        scheme = "nbds" if self.tls else "nbd"
        query = [("socket", self.socket)] if self.socket else []
        query += tls_query(self.tls)
        tail = "?" + urllib.parse.urlencode(query, safe="/") if query else ""
        if self.socket:
            return f"{scheme}+unix:///{export}{tail}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{export}{tail}"


def tls_query(tls: TLSOptions | None) -> list[tuple[str, str]]:
    if tls is None:
        return []
    query = [("tls-certificates", tls.certificates)] if tls.certificates else []
    if not tls.verify_peer:
        query.append(("tls-verify-peer", "false"))
    if tls.hostname:
        query.append(("tls-hostname", tls.hostname))
    return query


def parse_uri(text: str) -> Address:
    """Parse an NBD URI; raises ``BadURI`` (its message does not repeat the URI)."""
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError as exc:  # e.g. "Invalid IPv6 URL"
        raise BadURI(f"not an NBD URI: {exc}") from None
    if parts.scheme in ("nbd+vsock", "nbds+vsock"):
        raise BadURI(f"{parts.scheme}:// is not supported (use nbd[s]:// or nbd[s]+unix://)")
    if parts.scheme not in SCHEMES:
        if parts.scheme and text.startswith(f"{parts.scheme}://"):
            speaks = ", ".join(f"{s}://" for s in SCHEMES_SPOKEN)
            raise BadURI(f"unsupported URI scheme '{parts.scheme}' (blockfuse speaks {speaks})")
        raise BadURI(
            "not an NBD URI (nbd[s]://HOST[:PORT]/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH)"
        )
    if parts.username is not None or parts.password is not None:
        raise BadURI("a user name in the URI is for TLS-PSK, which blockfuse does not support")
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = parse_query(parts.query)
    tls = parse_tls(parts.scheme, query)
    if parts.scheme.endswith("+unix"):
        return _unix(parts, export, query, tls)
    return _tcp(parts, export, query, tls)


def parse_query(text: str) -> dict[str, str]:
    """Query parameters, each at most once."""
    query: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(text, keep_blank_values=True):
        if key in query:
            raise BadURI(f"?{key}= is given twice")
        query[key] = value
    return query


def parse_tls(scheme: str, query: dict[str, str]) -> TLSOptions | None:
    """The TLS parameters taken out of ``query`` (``None`` for a plaintext scheme)."""
    given = {key: query.pop(key) for key in TLS_PARAMETERS if key in query}
    if not scheme.startswith("nbds"):
        if given:
            key = next(iter(given))
            raise BadURI(f"{key}= needs TLS: write {scheme.replace('nbd', 'nbds', 1)}://")
        return None
    if given.get("tls-type", "x509").lower() != "x509":
        raise BadURI(f"tls-type={given['tls-type']}: blockfuse supports X.509 certificates only")
    certificates = given.get("tls-certificates")
    if certificates == "":
        raise BadURI("tls-certificates= needs a directory")
    hostname = given.get("tls-hostname")
    if hostname == "":
        raise BadURI("tls-hostname= needs a name")
    verify = parse_flag(given.get("tls-verify-peer", "true"), "tls-verify-peer")
    return TLSOptions(certificates, verify, hostname)


def parse_flag(text: str, key: str) -> bool:
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise BadURI(f"bad {key}={text!r} (use true or false)")


def refuse_unknown(scheme: str, query: dict[str, str]) -> None:
    if query:
        key = next(iter(query))
        if key.startswith("tls-"):
            raise BadURI(f"?{key}= is not supported (known: {', '.join(TLS_PARAMETERS)})")
        raise BadURI(f"{scheme}:// takes no ?{key}= parameter")


def _unix(
    parts: urllib.parse.SplitResult, export: str, query: dict[str, str], tls: TLSOptions | None
) -> Address:
    scheme = parts.scheme
    if parts.netloc:
        raise BadURI(f"{scheme}:// takes no host (write {scheme}:///EXPORT?socket=PATH)")
    socket = query.pop("socket", "")
    if not socket:
        raise BadURI(f"{scheme}:// needs ?socket=PATH")
    refuse_unknown(scheme, query)
    return Address(export, socket=socket, tls=tls)


def _tcp(
    parts: urllib.parse.SplitResult, export: str, query: dict[str, str], tls: TLSOptions | None
) -> Address:
    if "socket" in query:
        raise BadURI(f"?socket= is for {parts.scheme}+unix:///EXPORT?socket=PATH")
    refuse_unknown(parts.scheme, query)
    if not parts.hostname:
        raise BadURI(f"{parts.scheme}:// needs a host")
    try:
        port = DEFAULT_PORT if parts.port is None else parts.port
    except ValueError:  # not a number, or above 65535 (urllib's words are not ours)
        given = parts.netloc.rpartition(":")[2]
        raise BadURI(f"bad port {given!r} (use a number from 1 to 65535)") from None
    if port == 0:
        raise BadURI("bad port 0 (leave the port out for 10809)")
    return Address(export, host=parts.hostname, port=port, tls=tls)
