"""The TLS client on a socket: ciphertext read straight from the socket into the
session's incoming BIO and decrypted straight into the caller's buffer; records written
straight from the outgoing BIO to the socket.

    socket --os.readv--> one reusable 256 KiB buffer --write--> incoming MemoryBIO
                                                                     |
                              caller's buffer (a READ's) <--read-- SSLObject
    socket <--os.write-- outgoing MemoryBIO <--write-- a request

``trio.SSLStream`` still does the handshake and the close; once the session is up,
receiving and sending go this way (trio's receive costs a scheduler trip, a fresh bytes
object and a Python-level retry loop per 256 KiB of ciphertext, and its send a few
trips per request).  Both share the stream's one ``SSLObject`` and its BIOs (trio's
private ``_ssl_object``, ``_incoming`` and ``_outgoing``: ``on_socket`` is ``None`` on a
trio without them, or a transport that is not a socket, and the stream then goes
through trio).

Why sharing is safe:

- Only one task receives at a time (the receiver's turn) and one sends (the sender's),
  and sending never needs to receive nor receiving to send: TLS 1.3 has no
  renegotiation and the client's context refuses TLS 1.2's (``OP_NO_RENEGOTIATION``).
- What decrypting makes OpenSSL write (the answer to a KeyUpdate, the alert refusing a
  renegotiation) stays in the outgoing BIO, in order, and leaves before the next
  request's records: RFC 8446 asks a KeyUpdate's answer before the next application
  data, no sooner.
- A send that stops halfway (cancelled, the socket closed) has taken its records from
  the BIO, and the server may have part of one: the session is broken from then on,
  and ``aclose`` sends no close_notify after it, nor under a send still waiting.
- Nothing is consumed before the only waits (``wait_readable``, and a checkpoint every
  ``BURST`` fills so that a fast server cannot starve the other tasks), so a cancelled
  receive (the call's deadline, the reader's watchdog) loses nothing.  After every wait
  the socket is looked at before it is read or written (its number may be another
  file's by then: receiver.py's ``_still_open``).

How a session ends: the server's close_notify makes ``read`` return 0 (the end, 0
here); the socket's end without one (``SSLEOFError``), or bytes that are not this
session's records, are an ``ssl.SSLError`` raised as a ``trio.BrokenResourceError``,
as trio raises it, and every later receive raises it again.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable

import trio

from .sender import still_open

TRANSPORT_READ = 1 << 18
"""Bytes of ciphertext read from the socket at once (64 KiB and 1 MiB are slower)."""
BURST = 16
"""Fills from the socket in a row without a trip through the scheduler."""


class SendCutShort(trio.BrokenResourceError):
    """A send stopped halfway before this one (see the module text)."""


def on_socket(
    tls: trio.SSLStream[trio.abc.Stream],
) -> tuple[CiphertextReader, CiphertextWriter] | None:
    """The reader and writer for ``tls`` (handshake done) if it runs over a socket and
    trio's SSLStream has the parts they share; else ``None``."""
    ssl_object = getattr(tls, "_ssl_object", None)
    incoming = getattr(tls, "_incoming", None)
    outgoing = getattr(tls, "_outgoing", None)
    sock = socket_under(tls.transport_stream)
    if sock is None or not isinstance(ssl_object, ssl.SSLObject):
        return None
    if not isinstance(incoming, ssl.MemoryBIO) or not isinstance(outgoing, ssl.MemoryBIO):
        return None
    return CiphertextReader(sock, ssl_object, incoming), CiphertextWriter(
        sock, ssl_object, outgoing
    )


class CiphertextReader:
    """Receives a TLS session's plaintext by reading its socket directly; see the module
    text."""

    def __init__(
        self, sock: trio.socket.SocketType, ssl_object: ssl.SSLObject, incoming: ssl.MemoryBIO
    ) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._read: Callable[[int, memoryview], int] = ssl_object.read  # type: ignore[assignment]
        """``SSLObject.read`` with a buffer: how many bytes it decrypted into it."""
        self._incoming = incoming
        self._buffer = memoryview(bytearray(TRANSPORT_READ))
        self._fills = 0
        self._broken: trio.BrokenResourceError | None = None
        self._ended = False
        """The server's close_notify came (``read`` returned 0)."""

    async def receive_into(self, view: memoryview) -> int:
        """Decrypt into ``view`` at least one byte, waiting for the socket as needed, and
        every byte more that is already here and fits; how many (0: the server closed the
        session with close_notify).  Raises ``trio.BrokenResourceError`` (from the
        ``ssl.SSLError``) if the session broke, ``trio.ClosedResourceError`` if the
        socket was closed; ``ValueError`` for an empty ``view`` (as trio's
        ``receive_some(0)``: 0 would say the end)."""
        if not view:
            raise ValueError("receive_into needs a buffer of at least one byte")
        while True:
            n = self.decrypted_into(view)
            if n or self._ended:
                return n
            await self._fill()

    def decrypted_into(self, view: memoryview) -> int:
        """Decrypt into ``view`` what has been received, without waiting; how many bytes
        (0: none yet, or the end)."""
        if self._broken is not None:
            raise self._broken
        n = 0
        while n < len(view) and not self._ended:
            try:
                got = self._read(len(view) - n, view[n:])
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError as exc:
                return self._fail(exc, n)
            self._ended = not got
            n += got
        return n

    def _fail(self, exc: ssl.SSLError, n: int) -> int:
        """The session broke: raised from now on, after the ``n`` bytes decrypted before."""
        self._broken = trio.BrokenResourceError(f"TLS receive failed: {exc}")
        self._broken.__cause__ = exc
        if n:
            return n
        raise self._broken

    async def _fill(self) -> None:
        """Move the ciphertext the socket has (waiting for some) into the incoming BIO;
        the socket's end is the BIO's end."""
        self._fills += 1
        if self._fills >= BURST:
            self._fills = 0
            await trio.lowlevel.checkpoint()
        while (n := self._read_socket()) is None:
            self._fills = 0
            await trio.lowlevel.wait_readable(self._fd)
        if n:
            self._incoming.write(self._buffer[:n])
        else:
            self._incoming.write_eof()

    def _read_socket(self) -> int | None:
        """One read of the socket into the buffer: how many bytes (0: its end), ``None``
        if it has none now.  The socket is looked at first, as any checkpoint may have
        come since the last read (see the module text)."""
        if not still_open(self._sock, self._fd):
            raise trio.ClosedResourceError("the connection was closed")
        try:
            return os.readv(self._fd, [self._buffer])
        except BlockingIOError:
            return None
        except OSError as exc:
            raise trio.BrokenResourceError(f"receiving failed: {exc}") from exc


class CiphertextWriter:
    """Sends a TLS session's records by writing its socket directly; see the module text."""

    def __init__(
        self, sock: trio.socket.SocketType, ssl_object: ssl.SSLObject, outgoing: ssl.MemoryBIO
    ) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._ssl_object = ssl_object
        self._outgoing = outgoing
        self.sending = False
        """A send has records left to write (it waits for the socket)."""
        self.broken: trio.BrokenResourceError | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and write it, and whatever OpenSSL wrote before it; no
        checkpoint when the socket takes it all at once.  Raises
        ``trio.BrokenResourceError`` if the session is broken (or breaks: a send cut
        short by a cancel or an error breaks it), ``trio.ClosedResourceError`` if the
        socket was closed."""
        if self.broken is not None:
            raise self.broken
        if not data:  # SSLObject.write(b"") would be an EOF
            await trio.lowlevel.checkpoint()
            return
        try:
            self._ssl_object.write(data)
        except ssl.SSLError as exc:
            self.broken = trio.BrokenResourceError(f"TLS send failed: {exc}")
            raise self.broken from exc
        await self._write_all(memoryview(self._outgoing.read()))

    async def _write_all(self, out: memoryview) -> None:
        self.sending = True
        try:
            while out:
                sent = self._write_socket(out)
                if sent is None:
                    await trio.lowlevel.wait_writable(self._fd)
                else:
                    out = out[sent:]
        except BaseException:
            self.broken = SendCutShort(
                "a send was cut short, leaving part of its records unsent: the session cannot go on"
            )
            raise
        finally:
            self.sending = False

    def _write_socket(self, out: memoryview) -> int | None:
        """One write of ``out`` to the socket: how many bytes it took, ``None`` if none
        now; the socket is looked at first (see the reader's ``_read_socket``)."""
        if not still_open(self._sock, self._fd):
            raise trio.ClosedResourceError("the connection was closed")
        try:
            return os.write(self._fd, out)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise trio.BrokenResourceError(f"sending failed: {exc}") from exc


def socket_under(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket of a ``trio.SocketStream`` under ``stream``, through wrappers that name
    theirs ``inner`` (``tls.LargeReads``)."""
    while not isinstance(stream, trio.SocketStream):
        inner = getattr(stream, "inner", None)
        if not isinstance(inner, trio.abc.Stream):
            return None
        stream = inner
    return stream.socket
