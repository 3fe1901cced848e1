"""Running the sans-io handshake over a trio stream, and its refusals as exceptions.

With TLS the stream changes under way: at ``START_TLS`` the ``upgrade`` given (a
``TLSClient.start``) turns the connected stream into a TLS one, and the rest of the
handshake, and then the transmission, use that; ``run_handshake`` returns it.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Awaitable, Callable

import trio

from ..errors import BlockError, ProtocolError, Unreachable
from ..nbd.constants import Opt, Rep
from ..nbd.events import NEED_DATA, HandshakeEvent, OptionRefused, PeerClosed, StartTLS
from ..nbd.handshake import ClientHandshake
from ..units import printable

RECEIVE_SIZE = 1 << 16
Upgrade = Callable[[trio.abc.Stream], Awaitable[trio.abc.Stream]]
"""Runs the TLS handshake over a connected stream; the TLS stream (see tls.py)."""
HANDSHAKE_TIMEOUT = 30.0
"""Seconds a handshake may take unless the caller says otherwise."""


class ConnectionLost(BlockError):
    """The connection to the server broke (reset, closed, unreachable); it may come back."""

    errno = errno.EIO


class Stalled(ConnectionLost):
    """The server stopped answering: a request passed its deadline, or nothing we sent was
    taken for the whole timeout.  The connection was dropped; a new one may work."""

    errno = errno.ETIMEDOUT


class TimedOut(Unreachable):
    """A request got no answer by its deadline (on this connection or over reconnects).

    An ``Unreachable``: like a request whose server stayed away, it says nothing was lost
    (a mirror fails its checkpoint, not its copy, on such a flush; writes lost with a
    dropped connection are reported by the flush after the reconnect).  ETIMEDOUT rather
    than EIO: the request may yet have taken effect on the server (a write, say), and the
    error says what happened instead of looking like the server's own I/O error."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ETIMEDOUT


class TLSFailed(ConnectionLost):
    """TLS could not be set up with the server, or broke; the message says which."""


class TLSBroken(trio.BrokenResourceError):
    """A TLS session failed: a ``BrokenResourceError``, as any broken trio stream, so the
    layers above drop the connection; its text says why, in words (tls.py)."""


class HandshakeRefused(BlockError):
    """The server said no during the handshake (no such export, listing refused, ...)."""

    def __init__(self, message: str, refusal: OptionRefused) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.errno = REFUSAL_ERRNO.get(refusal.reply, errno.EIO)


class ExportUnusable(BlockError):
    """The server offered an export blockfuse cannot use (too big for a file)."""

    errno = errno.EFBIG


REFUSAL_ERRNO: dict[int, int] = {
    Rep.ERR_UNKNOWN: errno.ENOENT,
    Rep.ERR_POLICY: errno.EACCES,
    Rep.ERR_UNSUP: errno.EOPNOTSUPP,
    Rep.ERR_PLATFORM: errno.EOPNOTSUPP,
    Rep.ERR_TLS_REQD: errno.EACCES,
}


def refusal_message(
    refusal: OptionRefused, server: str, export: str | None, *, tls: bool = False
) -> str:
    """One line for a user; the server's own text in it is escaped (``printable``).
    ``tls``: the handshake was over TLS (or meant to be)."""
    text = printable(refusal.message)
    said = f" ({text})" if text else ""
    code = f"NBD_REP_{refusal.reply_name}"
    if refusal.option is Opt.STARTTLS:
        detail = f": {text}" if text else ""
        return (
            f"{server} does not offer TLS ({code} to NBD_OPT_STARTTLS{detail}); "
            f"an nbds URI never falls back to plaintext"
        )
    if refusal.reply == Rep.ERR_TLS_REQD and not tls:
        return f"{server} requires TLS ({code}): use an nbds:// or nbds+unix:// URI"
    if refusal.option is Opt.LIST:
        if refusal.reply == Rep.ERR_POLICY:
            detail = f": {text}" if text else ""
            return f"{server} refuses to list its exports ({code}{detail})"
        if refusal.reply in (Rep.ERR_UNSUP, Rep.ERR_PLATFORM):
            return f"{server} does not support listing exports ({code}){said}"
        return f"{server} refused to list its exports ({code}){said}"
    if refusal.reply == Rep.ERR_UNKNOWN:
        return f"{server} has no export named {export!r}{said}"
    return f"{server} refused export {export!r} ({code}){said}"


async def run_handshake(
    stream: trio.abc.Stream,
    hs: ClientHandshake,
    server: str,
    *,
    deadline: float | None = None,
    upgrade: Upgrade | None = None,
) -> tuple[HandshakeEvent, trio.abc.Stream]:
    """Drive ``hs`` to its outcome over ``stream`` by ``deadline`` (default:
    ``HANDSHAKE_TIMEOUT`` seconds from now), the TLS handshake included (``upgrade``, for
    a handshake made with ``tls``); the outcome, and the stream to go on with (the TLS
    one, if TLS was started).  Raises ``ProtocolError``/``ConnectionLost`` (``Stalled``
    when the server is too slow, ``TLSFailed`` when TLS fails); ``stream`` is then the
    caller's to close."""
    now = trio.current_time()
    if deadline is None:
        deadline = now + HANDSHAKE_TIMEOUT
    try:
        with trio.fail_at(deadline):
            return await _exchange(stream, hs, upgrade)
    except trio.TooSlowError:
        waited = deadline - now
        raise Stalled(f"{server}: no answer to the NBD handshake within {waited:g} s") from None
    except TLSBroken as exc:
        raise TLSFailed(f"{server}: {exc}") from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise ConnectionLost(f"{server}: connection lost during the handshake: {exc}") from exc
    except PeerClosed as exc:
        raise ConnectionLost(f"{server}: {exc}") from exc
    except ProtocolError as exc:
        raise ProtocolError(f"{server}: {exc}") from exc


async def _exchange(
    stream: trio.abc.Stream, hs: ClientHandshake, upgrade: Upgrade | None
) -> tuple[HandshakeEvent, trio.abc.Stream]:
    while True:
        event = hs.next_event()
        if isinstance(event, StartTLS):
            assert upgrade is not None, "a TLS handshake needs an upgrade"
            stream = await upgrade(stream)
            hs.tls_started()
            continue
        if event is not NEED_DATA:
            await _send_goodbye(stream, hs.data_to_send())
            return event, stream
        if out := hs.data_to_send():
            await stream.send_all(out)
        hs.receive_data(await stream.receive_some(RECEIVE_SIZE))


async def _send_goodbye(stream: trio.abc.Stream, data: bytes) -> None:
    """Send a final ABORT if there is one; the server may already be gone."""
    if not data:
        return
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.send_all(data)
