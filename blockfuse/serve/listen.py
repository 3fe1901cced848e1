"""Where a server listens: Unix sockets, TCP addresses, and sockets handed over by socket
activation; and the socket files it leaves behind, removed at exit.

Addresses as a user writes them (``--socket``, ``--listen``, ``mount --serve``)::

    ./vm1.sock  /run/nbd.sock  unix:vm1.sock     a Unix socket (any text with a "/")
    127.0.0.1:10809  [::1]:10809  host:10809     TCP
    :10809  10809                                TCP on 127.0.0.1 (the default host)

A non-loopback address must be written out, and draws a warning unless TLS is required
(``--tls=require``): without it, whoever can reach the address can read and write.
A Unix socket path that exists is reused only if it is a socket nobody answers on (a
server that died left it); a live one is refused.

Socket activation (systemd's protocol, which libnbd's ``nbdinfo -- [ CMD ]`` and
``connect_systemd_socket_activation`` speak): when ``LISTEN_PID`` is this process and
``LISTEN_FDS`` is N, descriptors 3 .. 3+N-1 are listening sockets to serve; the
variables are removed so that children do not take them for their own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from urllib.parse import quote

import trio

from ..nbd.constants import DEFAULT_PORT
from ..nbd.haggling import TLSPolicy

DEFAULT_HOST = "127.0.0.1"
BACKLOG = 128
FIRST_ACTIVATED_FD = 3


class ListenError(Exception):
    """A listening address that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class Address:
    """A Unix socket ``path``, or a TCP ``host`` and ``port``."""

    path: str | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def uri(self, export: str = "", *, tls: bool = False) -> str:
        """The NBD URI of ``export`` here (what nbdinfo, qemu and nbdcopy take); ``tls``:
        the ``nbds`` one."""
        name = quote(export, safe="")
        s = "s" if tls else ""
        if self.path is not None:
            return f"nbd{s}+unix:///{name}?socket={quote(os.path.abspath(self.path), safe='/')}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd{s}://{host}:{self.port}/{name}"

    @property
    def loopback(self) -> bool:
        if self.path is not None or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_address(text: str) -> Address:
    """An address as the module text lists them; ``ValueError`` says what is wrong."""
    if text.startswith("unix:"):
        text = text[len("unix:") :]
        if not text:
            raise ValueError("unix: needs a socket path")
        return Address(path=text)
    if "/" in text:
        return Address(path=text)
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port
        raise ValueError(f"{text!r} is not HOST:PORT, :PORT or a socket path (with a /)")
    return Address(host=host or DEFAULT_HOST, port=int(port))


def tls_warning(address: Address, tls: TLSPolicy = TLSPolicy.OFF) -> str | None:
    """The warning for serving ``address`` with the TLS policy ``tls``, if it reaches
    beyond this host and TLS is not required."""
    if address.loopback or tls is TLSPolicy.REQUIRE:
        return None
    if tls is TLSPolicy.ON:
        return (
            f"warning: serving on {address} with TLS optional (--tls=on): a client that does "
            f"not ask for TLS is served in plaintext, so anyone who can reach it can read and "
            f"write the exported devices (--tls=require refuses plaintext)"
        )
    return (
        f"warning: serving on {address} without TLS: anyone who can reach it can read and "
        f"write the exported devices (--tls=require --tls-certificates DIR encrypts)"
    )


# --- opening ---------------------------------------------------------------------------


@dataclass
class Listening:
    """The listeners of a server, and the socket files it made (removed by ``close``)."""

    listeners: list[trio.SocketListener]
    addresses: list[Address]
    made: list[tuple[str, int]]
    """(path, inode) of each socket file bound here."""

    async def aclose(self) -> None:
        """Close every listener and remove the socket files (idempotent)."""
        for listener in self.listeners:
            await listener.aclose()
        self.remove_files()

    def remove_files(self) -> None:
        """Remove the socket files made here, if they are still ours (same inode)."""
        for path, inode in self.made:
            with contextlib.suppress(OSError):
                if os.lstat(path).st_ino == inode:
                    os.unlink(path)
        self.made.clear()


async def listen(addresses: list[Address], *, mode: int | None = None) -> Listening:
    """Listen on every address (Unix sockets made with ``mode`` if given); raises
    ``ListenError`` (and leaves nothing behind) when one cannot be used."""
    out = Listening([], [], [])
    try:
        for address in addresses:
            if address.path is not None:
                sock = await unix_listener(address.path, mode)
                out.made.append((address.path, os.stat(address.path).st_ino))
                out.listeners.append(trio.SocketListener(sock))
                out.addresses.append(address)
            else:
                listeners = await tcp_listeners(address)
                out.listeners += listeners
                out.addresses += [address_of(lis.socket) for lis in listeners]  # port 0 bound
    except BaseException:
        await out.aclose()
        raise
    return out


async def unix_listener(path: str, mode: int | None) -> trio.socket.SocketType:
    clear_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        if mode is not None:
            os.chmod(path, mode)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    return sock


def clear_stale_socket(path: str) -> None:
    """Remove a socket file nobody answers on; refuse a live one or another file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a server that died left it
        return
    finally:
        probe.close()
    raise ListenError(f"{path} is in use by another server; stop it or choose another path")


async def tcp_listeners(address: Address) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(address.port, host=address.host, backlog=BACKLOG)
    except OSError as exc:
        raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}") from exc


# --- socket activation ----------------------------------------------------------------


def activated_fds(environ: dict[str, str] | None = None) -> list[int]:
    """The descriptors handed over by socket activation (none if it is not for us)."""
    env = os.environ if environ is None else environ
    try:
        pid, count = int(env.get("LISTEN_PID", "")), int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if pid != os.getpid() or count < 1:
        return []
    return list(range(FIRST_ACTIVATED_FD, FIRST_ACTIVATED_FD + count))


def take_activated(fds: list[int]) -> Listening:
    """Listeners on the activated ``fds``; raises ``ListenError`` for one that is not a
    listening stream socket.  The activation variables are removed."""
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    out = Listening([], [], [])
    for fd in fds:
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            raise ListenError(f"descriptor {fd} from socket activation is not listening")
        sock.set_inheritable(False)
        out.addresses.append(address_of(sock))
        out.listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    return out


def address_of(sock: socket.socket | trio.socket.SocketType) -> Address:
    name = sock.getsockname()
    if isinstance(name, str):
        return Address(path=name or "(unnamed)")
    return Address(host=name[0], port=name[1])
