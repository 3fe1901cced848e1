"""TLS for the NBD server (``--tls``): the certificate it presents, the CA it checks
client certificates against, and the TLS handshake after STARTTLS's ACK.

    S: ACK to STARTTLS                   (the last plaintext byte; the core waits)
    C: ClientHello ...   S: ServerHello, certificate ... (ServerTLS.accept)
    C: options again, over TLS           (the core goes on: tls_started())

``ServerTLS.load`` reads a certificates directory in the layout nbdkit and qemu use
(``server-cert.pem``, ``server-key.pem``, and ``ca-cert.pem`` for ``--tls-verify-peer``)
once, at startup: every problem is a ``TLSSetupError`` naming the file, before anything
listens.  A key that group or others may read is refused (``chmod 600``), an encrypted
one too (OpenSSL would ask for its password on the terminal).

The context: TLS 1.2 or newer, renegotiation refused (``OP_NO_RENEGOTIATION``; TLS 1.3
has none), a client certificate demanded and checked against ``ca-cert.pem`` only with
``verify_peer``.  ``accept`` has no clock of its own: the connection's handshake deadline
covers the TLS handshake too, so a client that stalls in it is dropped like one that
stalls anywhere else in the handshake.  What a failure says is for the log, in one line
(``explain``): bytes that are not TLS, no client certificate, one our CA did not sign,
a client that does not trust ours.  Reading stays bounded: ``trio.SSLStream`` refills
from the socket only when OpenSSL needs more, 256 KiB at a time (``tls.LargeReads``),
and a read returns at most what was asked.  Keys never appear anywhere; a connection
shows its TLS version and, when verified, its client certificate's subject
(``TLSSession``).
"""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..nbd.haggling import TLSPolicy
from ..units import printable
from .tls import (
    CA_FILE,
    NOT_TLS,
    LargeReads,
    StreamWrapper,
    file_error,
    more_decrypted,
    peer_subject,
    root_cause,
)

SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
PRIVATE = 0o077
"""Permission bits a private key must not have (group and others)."""


class TLSSetupError(Exception):
    """The TLS configuration cannot be used; the message is one line naming the file."""


class TLSHandshakeFailed(Exception):
    """A client's TLS handshake failed; the message says why, in one line."""


class ServerTLSStream(StreamWrapper):
    """What a connection reads and writes after STARTTLS: trio's ``SSLStream``, with
    reads that take every record it can already decrypt (``tls.more_decrypted``)."""

    def __init__(self, tls: trio.SSLStream[trio.abc.Stream]) -> None:
        super().__init__(tls)
        self.tls = tls

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return more_decrypted(self.tls, await self.tls.receive_some(max_bytes), max_bytes)


@dataclass(frozen=True)
class TLSSession:
    """A client's TLS session: the stream the connection reads and writes from then on."""

    stream: ServerTLSStream
    version: str
    client: str | None
    """The client certificate's subject (``CN=...``), when one was verified."""

    def describe(self) -> str:
        """``tls TLSv1.3`` or ``tls TLSv1.3, client CN=name``."""
        client = f", client {printable(self.client)}" if self.client else ""
        return f"tls {self.version}{client}"


@dataclass(frozen=True)
class ServerTLS:
    """How the server speaks TLS: its policy and (unless off) the context."""

    policy: TLSPolicy
    context: ssl.SSLContext | None = None
    directory: str | None = None
    verify_peer: bool = False

    @classmethod
    def load(
        cls, policy: TLSPolicy, directory: str | None, *, verify_peer: bool = False
    ) -> ServerTLS:
        """The configuration for ``--tls``; raises ``TLSSetupError`` for anything unusable."""
        if policy is TLSPolicy.OFF:
            return cls(policy)
        if directory is None:
            raise TLSSetupError(f"--tls={policy.value} needs --tls-certificates DIR")
        return cls(policy, server_context(directory, verify_peer), directory, verify_peer)

    async def accept(self, stream: trio.abc.Stream) -> TLSSession:
        """The TLS handshake over ``stream`` (STARTTLS's ACK was sent); raises
        ``TLSHandshakeFailed`` saying why.  On failure ``stream`` is its owner's to close."""
        assert self.context is not None
        tls: trio.SSLStream[trio.abc.Stream] = trio.SSLStream(
            LargeReads(stream), self.context, server_side=True
        )
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            raise TLSHandshakeFailed(f"TLS handshake failed: {self.explain(exc)}") from exc
        cert = tls.getpeercert() if self.verify_peer else None
        subject = peer_subject(cert) if cert else None
        return TLSSession(ServerTLSStream(tls), tls.version() or "TLS", subject)

    def explain(self, exc: BaseException) -> str:
        """A failed TLS handshake in words."""
        cause = root_cause(exc)
        if cause is None or isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return "the client closed the connection"
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"the client's certificate was refused: {printable(cause.verify_message)}"
        if not isinstance(cause, ssl.SSLError):  # an OSError: reset, broken pipe
            return f"the client broke off the connection ({file_error(cause)})"
        reason = cause.reason or ""
        if reason in NOT_TLS:
            return "the client sent bytes that are not TLS after STARTTLS was accepted"
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "the client sent no certificate (--tls-verify-peer asks for one)"
        if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE"):
            return "the client does not accept our certificate"
        return f"TLS error {printable(reason or str(cause))}"


def server_context(directory: str, verify_peer: bool) -> ssl.SSLContext:
    """The context for the certificates in ``directory``; raises ``TLSSetupError``."""
    if not os.path.isdir(directory):
        raise TLSSetupError(f"--tls-certificates {directory}: no such directory")
    cert = os.path.join(directory, SERVER_CERT)
    key = os.path.join(directory, SERVER_KEY)
    ca = os.path.join(directory, CA_FILE)
    needed = (cert, key, ca) if verify_peer else (cert, key)
    for path in needed:
        readable_file(path, directory)
    private_key(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(cert, key, password=refuse_password(key))
    except ssl.SSLError as exc:
        why = file_error(exc)
        raise TLSSetupError(f"{cert}, {key}: not a usable certificate and key ({why})") from None
    except OSError as exc:  # refuse_password's TLSSetupError is not one
        raise TLSSetupError(f"{cert}, {key}: cannot be read ({file_error(exc)})") from None
    if verify_peer:
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            raise TLSSetupError(f"{ca}: not a usable CA certificate ({file_error(exc)})") from None
    return context


def refuse_password(key: str) -> Callable[[], str]:
    """OpenSSL's password callback: an encrypted key is an error, never a prompt."""

    def ask() -> str:
        raise TLSSetupError(f"{key} is encrypted; blockfuse needs an unencrypted key")

    return ask


def readable_file(path: str, directory: str) -> None:
    what = "--tls-verify-peer needs" if path.endswith(CA_FILE) else "--tls needs"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TLSSetupError(
            f"{path} is missing ({what} {os.path.basename(path)} in {directory})"
        ) from None
    except OSError as exc:
        raise TLSSetupError(f"{path}: cannot be read ({file_error(exc)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise TLSSetupError(f"{path} is not a regular file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TLSSetupError(f"{path}: cannot be read ({file_error(exc)})") from None


def private_key(path: str) -> None:
    """Refuse a key that group or others may read (or write)."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & PRIVATE:
        raise TLSSetupError(
            f"{path} is open to group or others (mode {mode:04o}); a private key must not "
            f"be: chmod 600 {path}"
        )
