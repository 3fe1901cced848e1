"""TLS for the NBD client (``nbds://``, ``nbds+unix://``): Python's ``ssl`` under
``trio.SSLStream``, started by STARTTLS.

    C: greeting flags, STARTTLS        S: ACK           (the last plaintext byte read)
    C: ClientHello ...                 S: ServerHello, certificate ... (TLSClient.start)
    C: every option again, over TLS    S: ...           (the handshake machine goes on)

What the pieces are for:

- ``TLSClient`` holds the ``ssl.SSLContext`` made from the URI's options (one per
  device: reconnects reuse it, so the certificate files are read when it is opened) and
  the server's name (for SNI and, verifying, the certificate's check).
  ``client_context`` builds it; every problem with the files is a ``TLSFailed`` naming
  the file, and an encrypted key is refused (OpenSSL would otherwise ask for its
  password on the terminal, hanging a mount).
- ``TLSClient.start`` runs the TLS handshake over the connected stream right after
  STARTTLS's ACK.  It has no clock of its own: the NBD handshake's deadline (the request
  timeout) bounds it, as every other wait of the handshake.
- ``TLSStream`` is what the NBD client then reads and writes (``NBDClient`` sees a
  stream that is not a socket, so it takes its ``receive_some`` path, never the socket's
  fd).  It does four things beyond ``trio.SSLStream``: over a socket it receives and
  sends without it, ciphertext read straight from the socket and READ data decrypted
  straight into the caller's buffer, records written straight to the socket
  (tlssocket.py: trio's receive costs a scheduler trip, a fresh bytes object and a
  Python retry loop per 256 KiB, its send a few trips); its ``aclose`` is bounded
  (``CLOSE_TIMEOUT``; trio's sends a close_notify, which a server that stopped reading
  would hold forever, and callers close under a shield); a TLS failure is a
  ``TLSBroken`` (a ``trio.BrokenResourceError``, so every layer above treats it as a
  broken connection) whose text says what went wrong; and it describes itself for the
  status (``describe``): the TLS version and the peer certificate's subject.
- ``LargeReads`` and ``more_decrypted`` (the server's TLS uses them too, and the client
  over a stream that is not a socket) make a read through trio cost less than a trip
  through the scheduler per 16 KiB record: trio's stream refills 256 KiB from the
  socket at a time, and a read takes every record already received.

The context refuses TLS 1.2's renegotiation (``OP_NO_RENEGOTIATION``; TLS 1.3 has
none), so decrypting never has to send and wait, nor sending to receive (tlssocket.py).

Failures say which, in one line (``explain``): an unknown CA, a wrong host name, an
expired certificate, no client certificate where the server wants one, a server that
does not answer in TLS.  GnuTLS servers (nbdkit, qemu-nbd), and trio's, that refuse the
client's certificate finish the TLS 1.3 handshake (on the client's side it ends before
the server has checked that certificate) and then close the connection without an
alert, so a TLS stream closed before its first byte arrived is reported as most likely
that (the message also names the other cause: a server that stopped, or ended the
connection for a reason of its own, which only its log tells).  Nothing secret is ever
in a message: file names, never their contents.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from ..nbd.uri import Address, TLSOptions
from ..units import printable
from .handshake import TLSBroken, TLSFailed
from .tlssocket import (
    TRANSPORT_READ,
    CiphertextReader,
    CiphertextWriter,
    SendCutShort,
    on_socket,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

CA_FILE = "ca-cert.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
CLOSE_TIMEOUT = 2.0
"""Seconds ``TLSStream.aclose`` may spend sending close_notify before it just closes."""

# OpenSSL's certificate verification results (X509_V_ERR_*) that have words of their own.
X509_NOT_YET_VALID = 9  # CERT_NOT_YET_VALID
X509_EXPIRED = 10  # CERT_HAS_EXPIRED
X509_WRONG_NAME = (62, 64)  # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH
X509_UNKNOWN_CA = (2, 18, 19, 20, 21)
"""UNABLE_TO_GET_ISSUER_CERT, DEPTH_ZERO_SELF_SIGNED_CERT, SELF_SIGNED_CERT_IN_CHAIN,
UNABLE_TO_GET_ISSUER_CERT_LOCALLY, UNABLE_TO_VERIFY_LEAF_SIGNATURE."""

QUIET_ENDINGS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
"""How a TLS session ends without the server saying why (no alert)."""

NOT_TLS = (
    "WRONG_VERSION_NUMBER",
    "UNKNOWN_PROTOCOL",
    "PACKET_LENGTH_TOO_LONG",
    "RECORD_LAYER_FAILURE",
    "HTTP_REQUEST",
)
"""OpenSSL's reasons for bytes that are not TLS records."""

SUBJECT_KEYS = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "domainComponent": "DC",
}


@dataclass(frozen=True)
class TLSClient:
    """How to start TLS with one server: the context, the server's name (``None``: none;
    its certificate must carry it when the peer is verified, else only the chain is
    checked), and the options they come from."""

    context: ssl.SSLContext
    hostname: str | None
    options: TLSOptions

    @classmethod
    def for_address(cls, address: Address) -> TLSClient:
        """For an ``nbds`` address; raises ``TLSFailed`` if its certificates are unusable.
        Warns (a log warning) if the server will not be verified."""
        assert address.tls is not None
        if not address.tls.verify_peer:
            log.warning(
                "%s: tls-verify-peer=false: the server's certificate is not checked, so "
                "anyone on the way can pose as the server",
                address.server,
            )
        context = client_context(address.tls, check_hostname=address.tls_hostname is not None)
        return cls(context, address.tls_hostname, address.tls)

    async def start(self, stream: trio.abc.Stream) -> TLSStream:
        """The TLS handshake over ``stream`` (STARTTLS was accepted); raises ``TLSBroken``
        saying why (``run_handshake`` makes it a ``TLSFailed`` naming the server).  On
        failure ``stream`` is left to its owner to close."""
        tls: trio.SSLStream[trio.abc.Stream] = trio.SSLStream(
            LargeReads(stream), self.context, server_hostname=self.hostname
        )
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            raise TLSBroken(f"TLS handshake failed: {self.explain(exc)}") from exc
        return TLSStream(tls, self)

    def explain(self, exc: BaseException) -> str:
        """A TLS failure (``exc`` or what caused it) in words, for one line."""
        cause = root_cause(exc)
        if isinstance(cause, ssl.SSLCertVerificationError):
            return self._verification(cause)
        if cause is None or isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return "the server closed the connection"
        if isinstance(cause, ssl.SSLError):
            return self._alert(cause)
        return file_error(cause)

    def _verification(self, exc: ssl.SSLCertVerificationError) -> str:
        code = exc.verify_code
        if code == X509_EXPIRED:
            return "the server's certificate has expired"
        if code == X509_NOT_YET_VALID:
            return "the server's certificate is not valid yet"
        if code in X509_WRONG_NAME:
            return (
                f"the server's certificate is not for {self.hostname!r} (wrong host name; "
                f"tls-hostname=NAME names the one to expect)"
            )
        if code in X509_UNKNOWN_CA:
            return f"the server's certificate is not signed by a CA we trust ({self._trusted()})"
        return f"the server's certificate was refused: {printable(exc.verify_message)}"

    def _trusted(self) -> str:
        directory = self.options.certificates
        if directory and os.path.exists(os.path.join(directory, CA_FILE)):
            return f"unknown CA: we trust {os.path.join(directory, CA_FILE)}"
        return "unknown CA: we trust the system's CA store"

    def _alert(self, exc: ssl.SSLError) -> str:
        reason = exc.reason or ""
        if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
            return f"the server requires a client certificate{self._client_note()}"
        if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE"):
            return f"the server does not accept our client certificate{self._client_note()}"
        if reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED":
            return "the server says our client certificate has expired"
        if reason in NOT_TLS:
            return "the server does not speak TLS after accepting STARTTLS"
        return f"TLS error {printable(reason or str(exc))}"

    def _client_note(self) -> str:
        paths = client_certificate(self.options)
        if paths is None:
            return f" (we have none: put {CLIENT_CERT} and {CLIENT_KEY} in tls-certificates=DIR)"
        return f" ({paths[0]})"

    def closed_at_once(self) -> str:
        """Why a server closes a TLS session before sending anything (GnuTLS servers do
        so after refusing the client's certificate)."""
        why = "the server closed the TLS connection at once: most likely it"
        other = ", or it closed it for another reason (its log says which)"
        if client_certificate(self.options) is None:
            return f"{why} requires a client certificate{self._client_note()}{other}"
        return f"{why} does not accept our client certificate{self._client_note()}{other}"


class TLSStream(trio.abc.Stream):
    """A client's TLS session over a connected stream; see the module text."""

    def __init__(self, tls: trio.SSLStream[trio.abc.Stream], client: TLSClient) -> None:
        self._tls = tls
        self._client = client
        self._received = 0
        direct = on_socket(tls)
        self._reader: CiphertextReader | None = direct[0] if direct else None
        self._writer: CiphertextWriter | None = direct[1] if direct else None
        """Receive and send straight on the socket (tlssocket.py); ``None``: through trio."""
        self.version: str = tls.version() or "TLS"
        self.peer = peer_subject(tls.getpeercert())

    def describe(self) -> str:
        """``'tls TLSv1.3, peer CN=localhost,O=Example'`` (or ``peer not verified``)."""
        return f"tls {self.version}, peer {printable(self.peer)}"

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            if self._writer is not None:
                await self._writer.send_all(data)
            else:
                await self._tls.send_all(data)
        except trio.BrokenResourceError as exc:
            raise self._broken(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        await self._tls.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._reader is not None:
            out = bytearray(max_bytes or RECEIVE_SOME)
            with memoryview(out) as view:
                n = await self.receive_into(view)
            del out[n:]
            return out
        data = await self._received_from(self._tls.receive_some(max_bytes))
        data = more_decrypted(self._tls, data, max_bytes)
        self._received += len(data)
        return data

    async def receive_into(self, view: memoryview) -> int:
        """Up to ``len(view)`` decrypted bytes straight into ``view`` (a READ's buffer),
        how many (0: the end): those already decrypted, else what one wait brings in,
        every record of it that fits (``decrypted_into``)."""
        if self._reader is not None:
            n = await self._received_from(self._reader.receive_into(view))
        else:
            n = decrypted_into(self._tls, view)
            if not n:
                data = await self._received_from(self._tls.receive_some(len(view)))
                n = len(data)
                view[:n] = data
                n += decrypted_into(self._tls, view[n:])
        self._received += n
        return n

    async def _received_from(self, receiving: Awaitable[T]) -> T:
        """What ``receiving`` gets (bytes, or a count of them), its failure as a
        ``TLSBroken``; an end before the server sent anything is one too."""
        try:
            got = await receiving
        except trio.BrokenResourceError as exc:
            raise self._broken(exc) from exc
        if not got and not self._received:
            raise TLSBroken(self._client.closed_at_once())
        return got

    def _broken(self, exc: BaseException) -> TLSBroken:
        """A failure in words; one without a TLS alert before the server sent anything
        is most likely a refused client certificate (see the module text)."""
        if isinstance(exc, SendCutShort):
            return TLSBroken(f"TLS: {exc}")
        cause = root_cause(exc)
        alert = isinstance(cause, ssl.SSLError) and not isinstance(cause, QUIET_ENDINGS)
        if not self._received and not alert:
            return TLSBroken(self._client.closed_at_once())
        return TLSBroken(f"TLS: {self._client.explain(exc)}")

    async def aclose(self) -> None:
        """close_notify if it leaves within ``CLOSE_TIMEOUT``; the connection is closed in
        any case (also when cancelled)."""
        writer = self._writer
        try:
            if writer is None or not (writer.sending or writer.broken):
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self._tls.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(self._tls.transport_stream)


RECEIVE_SOME = 1 << 16
"""Bytes ``TLSStream.receive_some()`` without a size returns at most."""


class StreamWrapper(trio.abc.Stream):
    """A stream that passes every call on to ``inner``; a subclass changes what it must."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


class LargeReads(StreamWrapper):
    """The transport under a TLS stream: ``receive_some()`` without a size (what
    ``trio.SSLStream`` calls) reads up to ``TRANSPORT_READ`` bytes; the rest is passed on."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes or TRANSPORT_READ)


def more_decrypted(
    tls: trio.SSLStream[trio.abc.Stream], data: bytes | bytearray, max_bytes: int | None
) -> bytes | bytearray:
    """``data`` and whatever more ``tls`` can decrypt at once from what it has received,
    up to ``max_bytes``, without waiting.

    ``trio.SSLStream.receive_some`` returns one TLS record (16 KiB at most: OpenSSL's
    ``SSL_read`` stops at a record's end) per call, and every call costs a trip through
    the scheduler; a 1 MiB reply took 64 of them.  The records that are already in the
    session's buffer are decrypted here with the stream's own ``SSLObject`` (a private
    attribute of trio's, looked up so that a trio without it just skips this).  Nothing
    is written: a record that needs an answer (a KeyUpdate) is left for the stream's
    next call, as is an error, which that call then raises."""
    if not data or max_bytes is None or len(data) >= max_bytes or not _decrypts(tls):
        return data
    out = bytearray(max_bytes)
    out[: len(data)] = data
    with memoryview(out) as view:
        n = len(data) + decrypted_into(tls, view[len(data) :])
    if n == len(data):
        return data
    del out[n:]
    return out


def decrypted_into(tls: trio.SSLStream[trio.abc.Stream], view: memoryview) -> int:
    """Decrypt into ``view`` what ``tls`` has received and not yet decrypted, without
    waiting; how many bytes (see ``more_decrypted``)."""
    ssl_object = getattr(tls, "_ssl_object", None)
    if ssl_object is None:
        return 0
    n = 0
    while n < len(view):
        try:
            got = ssl_object.read(len(view) - n, view[n:])
        except ssl.SSLError:  # SSLWantReadError: nothing more decrypted yet
            break
        if not got:
            break
        n += got
    return n


def peer_subject(cert: dict[str, Any] | None) -> str:
    """A verified certificate's subject, ``CN=name,O=org`` (most specific first, as
    RFC 4514 writes it); unverified: ``not verified``."""
    if not cert:
        return "not verified (tls-verify-peer=false)"
    parts = [
        f"{SUBJECT_KEYS.get(key, key)}={value}"
        for rdn in cert.get("subject", ())
        for key, value in rdn
    ]
    return ",".join(reversed(parts)) or "(empty subject)"


def root_cause(exc: BaseException) -> BaseException | None:
    """The ``ssl.SSLError`` or ``OSError`` behind a broken stream, if there is one."""
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, ssl.SSLError | OSError):
        seen = seen.__cause__ or seen.__context__
    return seen


def client_certificate(options: TLSOptions) -> tuple[str, str] | None:
    """``(certificate, key)`` paths if the certificates directory has a client's."""
    if options.certificates is None:
        return None
    cert = os.path.join(options.certificates, CLIENT_CERT)
    key = os.path.join(options.certificates, CLIENT_KEY)
    return (cert, key) if os.path.exists(cert) or os.path.exists(key) else None


def client_context(options: TLSOptions, *, check_hostname: bool = True) -> ssl.SSLContext:
    """The context for ``options``: the CA from ``ca-cert.pem`` (else the system's store),
    a client certificate if the directory has one, TLS 1.2 at least; raises ``TLSFailed``
    naming the file at fault."""
    directory = options.certificates
    if directory is not None and not os.path.isdir(directory):
        raise TLSFailed(f"tls-certificates={directory}: no such directory")
    ca = os.path.join(directory, CA_FILE) if directory else None
    try:
        if ca is not None and os.path.exists(ca):
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        else:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    except (ssl.SSLError, OSError) as exc:
        raise TLSFailed(f"{ca}: not a usable CA certificate ({file_error(exc)})") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    if not options.verify_peer:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.check_hostname = check_hostname
    load_client_certificate(context, options)
    return context


def load_client_certificate(context: ssl.SSLContext, options: TLSOptions) -> None:
    paths = client_certificate(options)
    if paths is None:
        return
    cert, key = paths
    for path in paths:
        if not os.path.exists(path):
            other = CLIENT_KEY if path == cert else CLIENT_CERT
            raise TLSFailed(f"{path} is missing (it goes with {other})")
    try:
        context.load_cert_chain(cert, key, password=refuse_password(key))
    except (ssl.SSLError, OSError) as exc:
        raise TLSFailed(
            f"{cert}, {key}: not a usable certificate and key ({file_error(exc)})"
        ) from None


def refuse_password(key: str) -> Callable[[], str]:
    """OpenSSL's password callback: an encrypted key is an error, never a prompt."""

    def ask() -> str:
        raise TLSFailed(f"{key} is encrypted; blockfuse needs an unencrypted key (as nbdkit does)")

    return ask


def file_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return printable(exc.reason or str(exc))
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return printable(str(exc))


def _decrypts(tls: trio.SSLStream[trio.abc.Stream]) -> bool:
    """``tls`` has the ``SSLObject`` (trio's private ``_ssl_object``) to decrypt with."""
    return getattr(tls, "_ssl_object", None) is not None
