"""Our NBD server over TLS, in this process: our own nbds client against it (the
conformance suite, client certificates, refusals), the connection facts ``blockfuse
status`` shows, and hostile clients around STARTTLS (bytes sneaked in before the ACK,
bytes that are not TLS, a stalled or garbled TLS handshake).  After each offender a good
client on the same server still works.  Real clients (libnbd, qemu) are in
test_tls_serve_interop.py."""

from __future__ import annotations

import contextlib
import logging
import ssl
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing

from blockfuse.block import BlockDevice
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.remote import RemoteDevice, open_remote
from blockfuse.nbd import constants as c
from blockfuse.nbd.haggling import TLSPolicy
from blockfuse.nbd.uri import parse_uri
from blockfuse.serve.exports import ServeBackend
from blockfuse.testing import check_block_device
from blockfuse.transport.connection import Limits
from blockfuse.transport.handshake import HandshakeRefused, TLSFailed
from blockfuse.transport.server import NBDServer
from blockfuse.transport.tlsserver import ServerTLS
from blockfuse.transport.writer import coalesced

from .conftest import require_tool
from .hostile_client import RawClient, info_data, option, request
from .servekit import Gate, Served, export_of, mem_export, serving, wait_until
from .tlscerts import Certificates, make_certificates

MiB = 1 << 20
REQUIRE, ON = TLSPolicy.REQUIRE, TLSPolicy.ON
SERVER_SUBJECT = "peer CN=localhost,O=blockfuse tests"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


def server_tls(
    certs: Certificates, policy: TLSPolicy = REQUIRE, *, verify: bool = False
) -> ServerTLS:
    return ServerTLS.load(policy, certs.dir("server"), verify_peer=verify)


def nbds(s: Served, certs: Certificates, client: str = "client", export: str = "disk") -> str:
    plain = s.uri(export)
    scheme, rest = plain.split("://", 1)
    sep = "&" if "?" in rest else "?"
    return f"{scheme.replace('nbd', 'nbds', 1)}://{rest}{sep}tls-certificates={certs.dir(client)}"


async def remote(nursery: trio.Nursery, uri: str) -> RemoteDevice:
    with trio.fail_after(20):
        return await open_remote(nursery, parse_uri(uri), retries=0)


async def still_works(nursery: trio.Nursery, s: Served, certs: Certificates) -> None:
    """A good TLS client on ``s`` writes and reads back."""
    dev = await remote(nursery, nbds(s, certs))
    data = b"still here" * 100
    buf = bytearray(len(data))
    with trio.fail_after(20):
        await dev.write(8, [data])
        await dev.read(8, [buf])
    assert buf == data
    await dev.aclose()


# --- our client ------------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize("verify", [False, True], ids=["any-client", "verify-peer"])
async def test_our_nbds_client_conforms_through_our_tls_server(
    nursery: trio.Nursery, short_tmp: Path, certs: Certificates, tcp: bool, verify: bool
) -> None:
    """Over TCP our client checks the certificate against 127.0.0.1 (it lists that IP)."""
    device = MemoryDevice(8 * MiB)
    tls = server_tls(certs, verify=verify)
    async with serving([export_of(device)], short_tmp, tls=tls, tcp=tcp) as s:
        uri = nbds(s, certs)
        dev = await remote(nursery, uri)
        assert dev.status()["connection"] == f"connected; tls TLSv1.3, {SERVER_SUBJECT}"
        [facts] = s.serving.server.clients()
        subject = "CN=blockfuse client" if verify else None
        assert facts["tls"] == "TLSv1.3" and facts["client_certificate"] == subject
        assert facts["export"] == "disk"
        await dev.aclose()

        async def make() -> BlockDevice:
            return await remote(nursery, uri)

        await check_block_device(make)


async def test_tls_on_serves_plaintext_and_tls_clients_side_by_side(
    nursery: trio.Nursery, short_tmp: Path, certs: Certificates
) -> None:
    async with serving([mem_export()], short_tmp, tls=server_tls(certs, ON)) as s:
        plain = await remote(nursery, s.uri())
        tls = await remote(nursery, nbds(s, certs))
        await plain.write(0, [b"p" * 512])
        buf = bytearray(512)
        await tls.read(0, [buf])
        assert buf == b"p" * 512
        clients = s.serving.server.clients()
        assert [f["tls"] for f in clients] == [None, "TLSv1.3"]
        assert plain.status()["connection"] == "connected"
        await plain.aclose()
        await tls.aclose()


async def test_a_plain_client_of_a_tls_only_server_is_told_to_use_nbds(
    nursery: trio.Nursery, short_tmp: Path, certs: Certificates
) -> None:
    async with serving([mem_export()], short_tmp, tls=server_tls(certs)) as s:
        with pytest.raises(HandshakeRefused) as caught:
            await remote(nursery, s.uri())
        assert str(caught.value) == (
            f"unix:{s.address.path} requires TLS (NBD_REP_ERR_TLS_REQD): use an nbds:// "
            f"or nbds+unix:// URI"
        )
        await still_works(nursery, s, certs)


async def test_nbds_to_a_server_without_tls_never_falls_back(
    nursery: trio.Nursery, short_tmp: Path, certs: Certificates
) -> None:
    async with serving([mem_export()], short_tmp) as s:
        with pytest.raises(HandshakeRefused, match=r"does not offer TLS \(NBD_REP_ERR_POLICY"):
            await remote(nursery, nbds(s, certs))


@pytest.mark.parametrize(
    ("client", "expected", "logged"),
    [
        ("client-nocert", "most likely it requires a client certificate", "sent no certificate"),
        ("client-foreign", "most likely it does not accept our client certificate", "refused"),
    ],
)
async def test_verify_peer_refuses_a_missing_or_foreign_client_certificate(
    nursery: trio.Nursery,
    short_tmp: Path,
    certs: Certificates,
    caplog: pytest.LogCaptureFixture,
    client: str,
    expected: str,
    logged: str,
) -> None:
    """The server says why in its log; the client can only guess (TLS 1.3 finishes on the
    client's side before the server has checked its certificate)."""
    async with serving([mem_export()], short_tmp, tls=server_tls(certs, verify=True)) as s:
        with caplog.at_level(logging.WARNING), pytest.raises(TLSFailed, match=expected):
            await remote(nursery, nbds(s, certs, client))
        assert f"dropped: TLS handshake failed: the client {logged}" in caplog.text or (
            "the client's certificate was refused" in caplog.text
        )
        await still_works(nursery, s, certs)


async def test_a_client_that_does_not_trust_our_ca_is_refused(
    nursery: trio.Nursery, short_tmp: Path, certs: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    """Ours hangs up without an alert (trio's SSLStream sends none), so the server can only
    say that the client closed; GnuTLS clients say why (test_tls_serve_interop.py)."""
    async with serving([mem_export()], short_tmp, tls=server_tls(certs)) as s:
        with caplog.at_level(logging.WARNING), pytest.raises(TLSFailed, match="unknown CA"):
            await remote(nursery, nbds(s, certs, "client-otherca"))
        closed = "TLS handshake failed: the client closed the connection"
        await wait_until(lambda: closed in caplog.text)
        await still_works(nursery, s, certs)


# --- hostile clients ----------------------------------------------------------------------------


async def starttls(raw: RawClient) -> None:
    """Greet and have STARTTLS accepted (nothing of TLS sent yet)."""
    await raw.greet()
    [reply] = await raw.ask(option(c.Opt.STARTTLS))
    assert reply.rtype == c.Rep.ACK


async def test_bytes_sent_with_starttls_before_its_reply_drop_the_connection(
    nursery: trio.Nursery, short_tmp: Path, certs: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    """A ClientHello sent in the same write as STARTTLS is never read as TLS: no ACK."""
    async with serving([mem_export()], short_tmp, tls=server_tls(certs)) as s:
        async with await RawClient.connect(str(s.address.path)) as bad:
            await bad.greet()
            await bad.send(option(c.Opt.STARTTLS) + client_hello())
            assert await bad.closed()
            assert bad.buf == b""  # not even the ACK
        assert "bytes after NBD_OPT_STARTTLS before its reply" in caplog.text
        await still_works(nursery, s, certs)


async def test_bytes_that_are_not_tls_after_the_ack_drop_the_connection(
    nursery: trio.Nursery, short_tmp: Path, certs: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving([mem_export()], short_tmp, tls=server_tls(certs, ON)) as s:
        async with await RawClient.connect(str(s.address.path)) as bad:
            await starttls(bad)
            await bad.send(option(c.Opt.GO) + b"GET / HTTP/1.0\r\n\r\n")  # plaintext again
            assert await bad.closed()
        assert "bytes that are not TLS after STARTTLS was accepted" in caplog.text
        await still_works(nursery, s, certs)


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01"], ids=["nothing", "half"])
async def test_a_stalled_tls_handshake_is_dropped_at_the_handshake_deadline(
    autojump_clock: object, certs: Certificates, sent: bytes
) -> None:
    server = NBDServer(ServeBackend([mem_export()]), tls=server_tls(certs))
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, server_end)
        raw = RawClient(client_end)
        started = trio.current_time()
        await starttls(raw)
        await raw.send(sent)
        with trio.fail_after(60):
            assert await raw.closed(within=60)
        assert trio.current_time() - started == pytest.approx(Limits().handshake_timeout, abs=1)
        await wait_until(lambda: server.connections == 0)


async def test_garbage_in_the_middle_of_the_tls_handshake_drops_the_connection(
    nursery: trio.Nursery, short_tmp: Path, certs: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    """A real ClientHello, the server's answer read, then a record of noise instead of the
    client's Finished."""
    async with serving([mem_export()], short_tmp, tls=server_tls(certs)) as s:
        async with await RawClient.connect(str(s.address.path)) as bad:
            await starttls(bad)
            await bad.send(client_hello())
            with trio.fail_after(10):
                while len(bad.buf) < 100:  # ServerHello ... Finished
                    bad.buf += await bad.stream.receive_some(1 << 16)
            await bad.send(b"\x17\x03\x03\x00\x40" + bytes(range(64)))
            assert await bad.closed()
        assert "TLS handshake failed" in caplog.text
        await still_works(nursery, s, certs)


async def test_renegotiation_is_refused(
    nursery: trio.Nursery, short_tmp: Path, certs: Certificates
) -> None:
    """``openssl s_client -tls1_2`` (TLS 1.3 has no renegotiation) asks for one with its
    ``R`` command, over a relay that did the STARTTLS part: the server answers with the
    no_renegotiation alert."""
    context = server_tls(certs).context
    assert context is not None and context.options & ssl.OP_NO_RENEGOTIATION
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    openssl = require_tool("openssl", "openssl")
    async with serving([mem_export()], short_tmp, tls=server_tls(certs)) as s:
        raw = await RawClient.connect(str(s.address.path))
        await starttls(raw)
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]
        nursery.start_soon(relay, listener, raw.stream)
        ca = f"{certs.dir('client')}/ca-cert.pem"
        argv = [openssl, "s_client", "-tls1_2", "-connect", f"127.0.0.1:{port}", "-CAfile", ca]
        proc = await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None
            out = b""
            with trio.fail_after(20):
                while b"Verify return code: 0 (ok)" not in out:  # the session is up
                    out += await proc.stdout.receive_some(1 << 16)
                await proc.stdin.send_all(b"R\n")
                while b"no renegotiation" not in out:
                    more = await proc.stdout.receive_some(1 << 16)
                    assert more, out.decode(errors="replace")[-2000:]
                    out += more
        finally:
            proc.kill()
            await proc.wait()
        assert b"RENEGOTIATING" in out
        await still_works(nursery, s, certs)
        await raw.stream.aclose()


async def relay(listener: trio.SocketListener, there: trio.abc.Stream) -> None:
    """Copy bytes both ways between the first connection to ``listener`` and ``there``."""

    async def copy(a: trio.abc.ReceiveStream, b: trio.abc.SendStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await a.receive_some(1 << 16):
                await b.send_all(data)

    async with listener:
        here = await listener.accept()
    async with here, trio.open_nursery() as nursery:
        nursery.start_soon(copy, here, there)
        await copy(there, here)
        nursery.cancel_scope.cancel()


def client_hello() -> bytes:
    """A TLS ClientHello (the first flight of a client that trusts anything)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=False)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_small_parts_are_joined_for_a_stream_that_is_not_a_socket() -> None:
    """Over TLS a READ reply's 20-byte header and 8-byte offset go in one record with
    each other (not one each); its data is passed on without a copy."""
    data = memoryview(bytearray(1 << 20))
    parts = coalesced([b"h" * 20, b"o" * 8, data, b"a" * 16, b"b" * 16])
    assert [len(p) for p in parts] == [28, 1 << 20, 32]
    assert parts[1] is data
    assert [len(p) for p in coalesced([b"x" * 40000, b"y" * 40000, b"z"])] == [40000, 40001]
    assert b"".join(coalesced([b"ab", memoryview(b"cd"), bytearray(b"ef")])) == b"abcdef"
    assert coalesced([]) == []


async def tls_raw(path: str, certs: Certificates) -> RawClient:
    """A scripted client that has negotiated TLS and opened ``disk`` over it."""
    plain = await RawClient.connect(path)
    await starttls(plain)
    context = ssl.create_default_context(cafile=f"{certs.dir('client')}/ca-cert.pem")
    tls = trio.SSLStream(plain.stream, context, server_hostname="localhost")
    with trio.fail_after(10):
        await tls.do_handshake()
    raw = RawClient(tls)
    assert (await raw.ask(option(c.Opt.STRUCTURED_REPLY)))[-1].rtype == c.Rep.ACK
    assert (await raw.ask(option(c.Opt.GO, info_data("disk"))))[-1].rtype == c.Rep.ACK
    return raw


async def test_a_flood_of_writes_over_tls_is_held_back_by_the_bounds(
    short_tmp: Path, certs: Certificates
) -> None:
    """As without TLS (test_serve_hostile.py): the server holds a bounded number of
    payloads, however fast TLS clients send writes to a device that does not answer."""
    gate = Gate(MemoryDevice(64 * MiB), range(0, 1 << 20), writes=True)
    limits = Limits(connection_bytes=4 * MiB, server_bytes=6 * MiB)
    async with serving([export_of(gate)], short_tmp, limits=limits, tls=server_tls(certs)) as s:
        server = s.serving.server
        floods = [await tls_raw(str(s.address.path), certs) for _ in range(3)]

        async def flood(raw: RawClient, base: int) -> None:
            for i in range(64):
                offset = base + i * MiB
                await raw.stream.send_all(request(c.Cmd.WRITE, offset, MiB) + bytes(MiB))

        async with trio.open_nursery() as nursery:
            for n, raw in enumerate(floods):
                nursery.start_soon(flood, raw, n * 16 * MiB)
            await gate.entered.wait()
            await trio.testing.wait_all_tasks_blocked(0.05)
            held = server._budget.held  # type: ignore[attr-defined]
            assert 0 < held <= limits.server_bytes + MiB
            nursery.cancel_scope.cancel()
        for raw in floods:
            await trio.aclose_forcefully(raw.stream)
        gate.release.set()
        await wait_until(lambda: server.connections == 0)
        assert server._budget.held == 0  # type: ignore[attr-defined]
