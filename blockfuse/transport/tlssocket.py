"""The TLS client's receive path on a socket: ciphertext read straight from the socket
into the session's incoming BIO, plaintext decrypted straight into the caller's buffer.

    socket --os.readv--> one reusable 256 KiB buffer --write--> incoming MemoryBIO
                                                                     |
                              caller's buffer (a READ's) <--read-- SSLObject

``trio.SSLStream`` still does the handshake, every send and the close; only receiving
goes this way once the session is up (trio's costs a scheduler trip, a fresh bytes object
and a Python-level retry loop per 256 KiB of ciphertext).  Both share the stream's one
``SSLObject`` and its BIOs (trio's private ``_ssl_object`` and ``_incoming``:
``CiphertextReader.for_stream`` is ``None`` on a trio without them, or a transport that
is not a socket, and the stream then reads through trio).

Why sharing is safe:

- Only one task receives at a time (the receiver's turn), and trio never reads the
  socket itself after the handshake: its sends never want to read, as TLS 1.3 has no
  renegotiation and the client's context refuses TLS 1.2's (``OP_NO_RENEGOTIATION``).
- What decrypting makes OpenSSL write (the answer to a KeyUpdate, the alert refusing a
  renegotiation) stays in the outgoing BIO, in order, and trio sends it before the next
  request's records: RFC 8446 asks a KeyUpdate's answer before the next application
  data, no sooner.
- Nothing is consumed before the only waits (``wait_readable``, and a checkpoint every
  ``BURST`` fills so that a fast server cannot starve the other tasks), so a cancelled
  receive (the call's deadline, the reader's watchdog) loses nothing.  After every wait
  the socket is looked at before it is read (its number may be another file's by then:
  receiver.py's ``_still_open``).

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

TRANSPORT_READ = 1 << 18
"""Bytes of ciphertext read from the socket at once (64 KiB and 1 MiB are slower)."""
BURST = 16
"""Fills from the socket in a row without a trip through the scheduler."""


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

    @classmethod
    def for_stream(cls, tls: trio.SSLStream[trio.abc.Stream]) -> CiphertextReader | None:
        """A reader for ``tls`` (handshake done) if it runs over a socket and trio's
        SSLStream has the parts it shares; else ``None``."""
        ssl_object = getattr(tls, "_ssl_object", None)
        incoming = getattr(tls, "_incoming", None)
        sock = socket_under(tls.transport_stream)
        if sock is None or not isinstance(ssl_object, ssl.SSLObject):
            return None
        if not isinstance(incoming, ssl.MemoryBIO):
            return None
        return cls(sock, ssl_object, incoming)

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
        if self._sock.fileno() != self._fd:
            raise trio.ClosedResourceError("the connection was closed")
        try:
            return os.readv(self._fd, [self._buffer])
        except BlockingIOError:
            return None
        except OSError as exc:
            raise trio.BrokenResourceError(f"receiving failed: {exc}") from exc


def socket_under(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket of a ``trio.SocketStream`` under ``stream``, through wrappers that name
    theirs ``inner`` (``tls.LargeReads``)."""
    while not isinstance(stream, trio.SocketStream):
        inner = getattr(stream, "inner", None)
        if not isinstance(inner, trio.abc.Stream):
            return None
        stream = inner
    return stream.socket
