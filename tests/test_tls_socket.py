"""The TLS client's receive path on a socket (tlssocket.py): a real socket pair, the server
a ``trio.SSLStream`` with Python's own TLS.  The data comes out whole and in order, and
each way a session ends or breaks says what it is: close_notify, the socket's end
without one, bytes that are not records, a socket closed under a wait or before a read,
a receive cancelled before anything came."""

from __future__ import annotations

import os
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from blockfuse.transport.handshake import TLSBroken
from blockfuse.transport.tls import TLSStream
from blockfuse.transport.tlssocket import CiphertextReader, CiphertextWriter

from .conftest import require_tool
from .test_tls_transport import server_context, tls_client
from .tlscerts import Certificates, make_certificates

MiB = 1 << 20


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@dataclass
class Pair:
    client: TLSStream
    server: trio.SSLStream[trio.SocketStream]
    server_socket: trio.SocketStream


@asynccontextmanager
async def tls_pair(certs: Certificates) -> AsyncIterator[Pair]:
    """A TLS session over a socket pair, handshake done; both ends closed afterwards."""
    ours, theirs = trio.socket.socketpair()
    server_socket = trio.SocketStream(theirs)
    server = trio.SSLStream(server_socket, server_context(certs), server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        client = await tls_client(certs).start(trio.SocketStream(ours))
    try:
        yield Pair(client, server, server_socket)
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()
            await trio.aclose_forcefully(server_socket)


async def test_a_socket_is_read_directly(certs: Certificates) -> None:
    """4 MiB in pieces of every size: whole and in order, by ``receive_into`` and
    ``receive_some`` alike, and more than one record at a time."""
    data = bytes(range(256)) * 4096 * 16
    async with tls_pair(certs) as pair:
        assert isinstance(pair.client._reader, CiphertextReader)
        assert isinstance(pair.client._writer, CiphertextWriter)
        got = bytearray()
        sizes = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pair.server.send_all, data)
                while len(got) < len(data):
                    if len(sizes) % 2:
                        piece = await pair.client.receive_some(MiB)
                    else:
                        view = memoryview(bytearray(MiB - len(sizes)))
                        piece = view[: await pair.client.receive_into(view)]
                    assert 0 < len(piece) <= MiB
                    sizes.append(len(piece))
                    got += piece
    assert got == data
    assert max(sizes) > 16 << 10, sizes


async def test_close_notify_is_the_end(certs: Certificates) -> None:
    """The server's close_notify is the end (0), though its socket stays open."""
    async with tls_pair(certs) as pair, trio.open_nursery() as nursery:
        await pair.server.send_all(b"last words")
        nursery.start_soon(pair.server.unwrap)  # sends close_notify, waits for ours
        buf = memoryview(bytearray(100))
        with trio.fail_after(5):
            assert buf[: await pair.client.receive_into(buf)] == b"last words"
            assert await pair.client.receive_into(buf) == 0
            assert await pair.client.receive_some(100) == b""
            await pair.client.aclose()  # our close_notify ends the server's unwrap


async def test_an_end_without_close_notify_breaks_the_session(
    certs: Certificates,
) -> None:
    """What came before the socket's end is read; then the end is a broken session,
    every time it is read again too."""
    async with tls_pair(certs) as pair:
        await pair.server.send_all(b"cut")
        await pair.server_socket.aclose()
        buf = memoryview(bytearray(100))
        with trio.fail_after(5):
            assert buf[: await pair.client.receive_into(buf)] == b"cut"
            for _ in range(2):
                with pytest.raises(TLSBroken, match=r"^TLS: the server closed the connection$"):
                    await pair.client.receive_into(buf)


async def test_bytes_that_are_not_records_break_the_session(
    certs: Certificates,
) -> None:
    async with tls_pair(certs) as pair:
        await pair.server.send_all(b"fine")
        await pair.server_socket.send_all(b"\x17\x03\x03\x00\x40" + bytes(range(64)))
        buf = memoryview(bytearray(100))
        with trio.fail_after(5):
            assert buf[: await pair.client.receive_into(buf)] == b"fine"
            with pytest.raises(TLSBroken, match=r"^TLS: TLS error "):
                await pair.client.receive_into(buf)


async def test_an_empty_buffer_is_refused(certs: Certificates) -> None:
    """As trio refuses ``receive_some(0)``: 0 would say the session ended."""
    async with tls_pair(certs) as pair, trio.open_nursery() as nursery:
        nursery.start_soon(pair.server.send_all, b"x")
        with trio.fail_after(5), pytest.raises(ValueError):
            await pair.client.receive_into(memoryview(bytearray(0)))


async def test_a_cancelled_receive_loses_nothing(certs: Certificates) -> None:
    async with tls_pair(certs) as pair:
        buf = memoryview(bytearray(100))
        with trio.move_on_after(0.1) as waited:
            await pair.client.receive_into(buf)
        assert waited.cancelled_caught
        await pair.server.send_all(b"after the deadline")
        with trio.fail_after(5):
            assert buf[: await pair.client.receive_into(buf)] == b"after the deadline"


async def test_closing_the_stream_ends_a_receive(certs: Certificates) -> None:
    async with tls_pair(certs) as pair:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pair.client.aclose)
                with pytest.raises(trio.ClosedResourceError):
                    await pair.client.receive_into(memoryview(bytearray(100)))


async def test_a_closed_socket_is_not_read_under_its_old_number(
    certs: Certificates,
) -> None:
    """The socket closed between two receives, its number given to a file: the next
    receive raises and leaves that file's bytes alone."""
    async with tls_pair(certs) as pair:
        reader = pair.client._reader
        assert reader is not None
        fd = reader._fd
        r, w = os.pipe()
        try:
            os.write(w, b"not TLS")
            pair.client._tls.transport_stream.inner.socket.close()  # type: ignore[attr-defined]
            os.dup2(r, fd)
            with pytest.raises(trio.ClosedResourceError):
                await pair.client.receive_into(memoryview(bytearray(100)))
            assert os.read(fd, 100) == b"not TLS"
        finally:
            for n in (fd, r, w):
                os.close(n)


async def test_a_socket_is_written_directly(certs: Certificates) -> None:
    """8 MiB sent while the server reads slowly (the socket fills: the send waits for
    it), then a short one; all of it arrives in order."""
    data = bytes(range(256)) * 4096 * 32
    got = bytearray()

    async def read_slowly(server: trio.SSLStream[trio.SocketStream], size: int) -> None:
        while len(got) < size:
            await trio.sleep(0.001)
            got.extend(await server.receive_some(1 << 16))

    async with tls_pair(certs) as pair:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_slowly, pair.server, len(data) + 5)
                await pair.client.send_all(data)
                await pair.client.send_all(b"after")
    assert got == data + b"after"


async def test_a_send_cut_short_breaks_the_session(certs: Certificates) -> None:
    """Cancelled with records left to write (the server reads nothing): every later send
    raises, and closing sends no close_notify after half a record."""
    async with tls_pair(certs) as pair:
        with trio.move_on_after(0.2) as waited:
            await pair.client.send_all(bytes(8 * MiB))
        assert waited.cancelled_caught
        for _ in range(2):
            with pytest.raises(TLSBroken, match=r"^TLS: a send was cut short, leaving part"):
                await pair.client.send_all(b"more")
        started = trio.current_time()
        await pair.client.aclose()
        assert trio.current_time() - started < 1


async def test_closing_the_stream_ends_a_send(certs: Certificates) -> None:
    """A send that waits for the socket (the server reads nothing) ends when the stream
    is closed, and the close does not wait for it."""
    async with tls_pair(certs) as pair:
        with trio.fail_after(1):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pair.client.aclose)
                with pytest.raises(trio.ClosedResourceError):
                    await pair.client.send_all(bytes(8 * MiB))


async def test_renegotiation_is_refused(short_tmp: Path, certs: Certificates) -> None:
    """A TLS 1.2 server (``openssl s_server``, its ``r`` command; TLS 1.3 has no
    renegotiation) asks for one: the client reads on without it and refuses it with the
    no_renegotiation alert, which leaves with its next bytes (tlssocket.py)."""
    context = tls_client(certs).context
    assert context.options & ssl.OP_NO_RENEGOTIATION
    directory = certs.dir("server")
    sock = short_tmp / "s.sock"
    argv = [require_tool("openssl", "openssl"), "s_server", "-tls1_2", "-unix", str(sock),
            "-cert", f"{directory}/server-cert.pem", "-key", f"{directory}/server-key.pem",
            "-naccept", "1"]  # fmt: skip
    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        with trio.fail_after(20):
            await output_until(proc.stdout, b"ACCEPT")
            stream = await tls_client(certs).start(await trio.open_unix_socket(str(sock)))
            assert stream.version == "TLSv1.2" and stream._reader is not None
            await proc.stdin.send_all(b"r\n")  # HelloRequest (what it prints is buffered)
            await trio.sleep(1)  # s_server reads its next line apart
            await proc.stdin.send_all(b"after\n")
            assert await stream.receive_some(100) == b"after\n"
            await stream.send_all(b"next request\n")
            await output_until(proc.stdout, b"no renegotiation")
            await stream.aclose()
    finally:
        proc.kill()
        await proc.wait()


async def output_until(out: trio.abc.ReceiveStream, text: bytes) -> None:
    seen = b""
    while text not in seen:
        more = await out.receive_some(1 << 16)
        assert more, seen.decode(errors="replace")[-2000:]
        seen += more
