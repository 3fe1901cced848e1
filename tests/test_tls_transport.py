"""The TLS client over in-memory streams, against a scripted NBD server whose TLS is
Python's own (OpenSSL): what each failure says, that every wait has a deadline, that a
reconnect redoes TLS, that closing is bounded.  Real peers (GnuTLS) are in
test_tls_interop.py."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from blockfuse.devices.remote import RemoteDevice
from blockfuse.errors import ProtocolError
from blockfuse.nbd import constants as c
from blockfuse.nbd.transmission import ClientTransmission
from blockfuse.nbd.uri import Address, TLSOptions
from blockfuse.transport.client import NBDClient
from blockfuse.transport.connect import wrap_nbd_stream
from blockfuse.transport.handshake import HandshakeRefused, Stalled, TLSFailed
from blockfuse.transport.reconnect import Reconnecting
from blockfuse.transport.tls import (
    CLOSE_TIMEOUT,
    LargeReads,
    TLSClient,
    TLSStream,
    more_decrypted,
)

from .test_nbd_direct import parked
from .test_tls_core import GREETING, reply
from .tlscerts import Certificates, make_certificates

SIZE = 1 << 20


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


def server_context(certs: Certificates, name: str = "server", *, verify: bool = False):  # type: ignore[no-untyped-def]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    directory = certs.dir(name)
    context.load_cert_chain(f"{directory}/server-cert.pem", f"{directory}/server-key.pem")
    if verify:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(f"{directory}/ca-cert.pem")
    return context


def tls_client(certs: Certificates, name: str = "client", **options: object) -> TLSClient:
    tls = TLSOptions(certs.dir(name), **options)  # type: ignore[arg-type]
    return TLSClient.for_address(Address("disk", host="localhost", tls=tls))


class Reader:
    """Exact reads from a stream, for the scripted server."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = await self.stream.receive_some()
            if not data:
                raise EOFError
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def option(self) -> tuple[int, bytes]:
        _, option, length = c.OPTION.unpack(await self.exactly(c.OPTION.size))
        return option, await self.exactly(length)


@dataclass
class Script:
    """What the scripted server does; ``tls_handshakes`` counts the ones that succeeded."""

    context: ssl.SSLContext
    starttls: int = c.Rep.ACK
    with_ack: bytes = b""
    after_ack: bytes = b""
    silent_after_ack: bool = False
    drop_first_request: bool = False
    tls_handshakes: int = 0
    connections: int = 0
    done: list[str] = field(default_factory=list)


async def serve(stream: trio.abc.Stream, script: Script) -> None:
    script.connections += 1
    try:
        await serve_one(stream, script)
    except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def serve_one(stream: trio.abc.Stream, script: Script) -> None:
    await stream.send_all(GREETING)
    plain = Reader(stream)
    await plain.exactly(4)
    assert (await plain.option())[0] == c.Opt.STARTTLS  # nothing before it
    await stream.send_all(reply(c.Opt.STARTTLS, script.starttls) + script.with_ack)
    if script.starttls != c.Rep.ACK:
        assert (await plain.option())[0] == c.Opt.ABORT  # and nothing in plaintext after
        return
    if script.silent_after_ack:
        await trio.sleep_forever()
    if script.after_ack:
        await plain.exactly(5)  # the client's hello has begun
        await stream.send_all(script.after_ack)
        await trio.sleep_forever()
    tls = trio.SSLStream(stream, script.context, server_side=True)
    await tls.do_handshake()
    script.tls_handshakes += 1
    await serve_options(tls, Reader(tls), script)


async def serve_options(tls: trio.SSLStream[trio.abc.Stream], r: Reader, script: Script) -> None:
    while True:
        option, _ = await r.option()
        if option == c.Opt.GO:
            export = c.INFO_EXPORT.pack(c.InfoType.EXPORT, SIZE, c.TxFlag.HAS_FLAGS)
            await tls.send_all(reply(c.Opt.GO, c.Rep.INFO, export) + reply(c.Opt.GO, c.Rep.ACK))
            return await serve_requests(tls, r, script)
        answer = c.Rep.ACK if option == c.Opt.ABORT else c.Rep.ERR_UNSUP
        await tls.send_all(reply(c.Opt(option), answer))
        if option == c.Opt.ABORT:
            return


async def serve_requests(tls: trio.SSLStream[trio.abc.Stream], r: Reader, script: Script) -> None:
    """READ (zeroes, simple replies) and DISC."""
    while True:
        _, _, cmd, cookie, _, length = c.REQUEST.unpack(await r.exactly(c.REQUEST.size))
        if cmd == c.Cmd.DISC:
            script.done.append("disc")
            return
        if script.drop_first_request and script.connections == 1:
            return
        await tls.send_all(c.SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, 0, cookie) + bytes(length))


async def connect(
    nursery: trio.Nursery, script: Script, tls: TLSClient, *, request_timeout: float = 30
) -> NBDClient:
    client_end, server_end = trio.testing.memory_stream_pair()
    nursery.start_soon(serve, server_end, script)
    return await wrap_nbd_stream(
        nursery, client_end, "disk", server="fake", request_timeout=request_timeout, tls=tls
    )


async def test_reads_over_tls(nursery: trio.Nursery, certs: Certificates) -> None:
    script = Script(server_context(certs))
    client = await connect(nursery, script, tls_client(certs))
    assert isinstance(client.stream, TLSStream)
    assert client.stream.describe() == "tls TLSv1.3, peer CN=localhost,O=blockfuse tests"
    buf = bytearray(b"x" * 4096)
    with trio.fail_after(10):
        await client.pread(memoryview(buf), 0)
        await client.aclose()
    assert buf == bytes(4096) and script.tls_handshakes == 1 and script.done == ["disc"]


async def test_read_data_over_tls_goes_straight_into_the_callers_buffer(
    nursery: trio.Nursery, certs: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone 1 MiB READ is decrypted into its buffer (``TLSStream.receive_into``): only
    the reply's header passes through the core's receive buffer."""
    fed: list[int] = []
    receive_data = ClientTransmission.receive_data

    def counting(self: ClientTransmission, data: bytes | bytearray) -> None:
        fed.append(len(data))
        receive_data(self, data)

    monkeypatch.setattr(ClientTransmission, "receive_data", counting)
    client = await connect(nursery, Script(server_context(certs)), tls_client(certs))
    buf = bytearray(b"x" * (1 << 20))
    with trio.fail_after(10):
        await parked(client)  # the request is alone: its caller reads
        fed.clear()
        await client.pread(memoryview(buf), 0)
        await client.aclose()
    assert buf == bytes(1 << 20)
    assert 0 < sum(fed) < 64 << 10, fed


async def test_an_unverified_peer_is_said_so(
    nursery: trio.Nursery, certs: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    tls = tls_client(certs, "client-otherca", verify_peer=False)  # would not verify
    assert "tls-verify-peer=false: the server's certificate is not checked" in caplog.text
    client = await connect(nursery, Script(server_context(certs, "server-wronghost")), tls)
    assert client.stream.describe().endswith("peer not verified (tls-verify-peer=false)")  # type: ignore[attr-defined]
    await client.aclose()


@pytest.mark.parametrize(
    ("server", "client", "message"),
    [
        ("server", "client-otherca", "not signed by a CA we trust (unknown CA: we trust "),
        ("server-wronghost", "client", "certificate is not for 'localhost' (wrong host name"),
        ("server-expired", "client", "the server's certificate has expired"),
    ],
)
async def test_verification_failures_say_which(
    nursery: trio.Nursery, certs: Certificates, server: str, client: str, message: str
) -> None:
    script = Script(server_context(certs, server))
    with trio.fail_after(10), pytest.raises(TLSFailed) as caught:
        await connect(nursery, script, tls_client(certs, client))
    assert str(caught.value).startswith("fake: TLS handshake failed: ")
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert script.tls_handshakes == 0


@pytest.mark.parametrize(
    ("client", "message"),
    [
        ("client-nocert", "most likely it requires a client certificate (we have none: put "),
        ("client-foreign", "most likely it does not accept our client certificate (/"),
    ],
)
async def test_a_server_that_wants_a_client_certificate(
    nursery: trio.Nursery, certs: Certificates, client: str, message: str
) -> None:
    """A trio server, like the GnuTLS ones, closes the connection without an alert after
    TLS 1.3's handshake (which ends, on the client's side, before the server has checked
    the client's certificate)."""
    script = Script(server_context(certs, verify=True))
    with trio.fail_after(10), pytest.raises(TLSFailed, match=r"^fake: the server closed") as e:
        await connect(nursery, script, tls_client(certs, client))
    assert message in str(e.value)
    assert "or it closed it for another reason (its log says which)" in str(e.value)
    assert script.tls_handshakes == 0


@pytest.mark.parametrize(
    ("client", "reason", "message"),
    [
        (
            "client-nocert",
            "TLSV13_ALERT_CERTIFICATE_REQUIRED",
            "the server requires a client certificate (we have none: put client-cert.pem and "
            "client-key.pem in tls-certificates=DIR)",
        ),
        ("client", "TLSV1_ALERT_UNKNOWN_CA", "the server does not accept our client certificate"),
        ("client", "SSLV3_ALERT_CERTIFICATE_EXPIRED", "says our client certificate has expired"),
        ("client", "WRONG_VERSION_NUMBER", "the server does not speak TLS after accepting"),
        ("client", "SOMETHING_ELSE", "TLS error SOMETHING_ELSE"),
    ],
)
def test_alerts_in_words(certs: Certificates, client: str, reason: str, message: str) -> None:
    """Servers that do send alerts (OpenSSL's own s_server, for one)."""
    alert = ssl.SSLError(1, f"[SSL: {reason}] ...")
    alert.reason = reason
    broken = trio.BrokenResourceError()
    broken.__cause__ = alert
    assert message in tls_client(certs, client).explain(broken)


async def test_a_server_that_refuses_starttls(nursery: trio.Nursery, certs: Certificates) -> None:
    script = Script(server_context(certs), starttls=c.Rep.ERR_POLICY)
    with trio.fail_after(10), pytest.raises(HandshakeRefused, match="does not offer TLS"):
        await connect(nursery, script, tls_client(certs))


async def test_bytes_sent_with_the_ack_drop_the_connection(
    nursery: trio.Nursery, certs: Certificates
) -> None:
    script = Script(server_context(certs), with_ack=reply(c.Opt.STRUCTURED_REPLY, c.Rep.ACK))
    with trio.fail_after(10), pytest.raises(ProtocolError, match="after accepting STARTTLS"):
        await connect(nursery, script, tls_client(certs))


async def test_a_server_that_answers_tls_in_plaintext(
    nursery: trio.Nursery, certs: Certificates
) -> None:
    script = Script(server_context(certs), after_ack=reply(c.Opt.STRUCTURED_REPLY, c.Rep.ACK))
    with trio.fail_after(10), pytest.raises(TLSFailed, match="does not speak TLS after"):
        await connect(nursery, script, tls_client(certs))


async def test_the_tls_handshake_has_the_deadline(
    nursery: trio.Nursery, certs: Certificates, autojump_clock: object
) -> None:
    script = Script(server_context(certs), silent_after_ack=True)
    started = trio.current_time()
    with pytest.raises(Stalled, match="no answer to the NBD handshake within 5 s"):
        await connect(nursery, script, tls_client(certs), request_timeout=5)
    assert trio.current_time() - started == pytest.approx(5)


async def test_a_reconnect_redoes_tls(nursery: trio.Nursery, certs: Certificates) -> None:
    script = Script(server_context(certs), drop_first_request=True)
    tls = tls_client(certs)

    async def reconnect(n: trio.Nursery) -> NBDClient:
        return await connect(n, script, tls)

    link = Reconnecting(nursery, reconnect, await reconnect(nursery))
    device = RemoteDevice(link, Address("disk", host="localhost", tls=tls.options))
    buf = bytearray(b"x" * 512)
    with trio.fail_after(20):
        await device.read(0, [buf])
    assert buf == bytes(512) and script.tls_handshakes == 2 and link.reconnects == 1
    connection = device.status()["connection"]
    assert connection.startswith("connected; tls TLSv1.3, peer CN=localhost,O=blockfuse tests;")
    assert "reconnected 1 time" in connection
    await device.aclose()


async def test_closing_is_bounded_when_the_server_reads_nothing(
    nursery: trio.Nursery, certs: Certificates, autojump_clock: object
) -> None:
    """close_notify cannot leave (nobody reads): the connection is closed anyway."""
    client_end, server_end = trio.testing.lockstep_stream_pair()
    server = trio.SSLStream(server_end, server_context(certs), server_side=True)
    client = trio.SSLStream(client_end, tls_client(certs).context, server_hostname="localhost")
    async with trio.open_nursery() as handshakes:
        handshakes.start_soon(server.do_handshake)
        handshakes.start_soon(client.do_handshake)
    stream = TLSStream(client, tls_client(certs))
    started = trio.current_time()
    with trio.CancelScope(shield=True):
        await stream.aclose()
    assert trio.current_time() - started == pytest.approx(CLOSE_TIMEOUT)
    with pytest.raises(trio.ClosedResourceError):
        await client_end.send_all(b"x")


async def test_a_read_takes_every_record_already_decrypted(certs: Certificates) -> None:
    """trio's SSLStream gives one TLS record (16 KiB) per receive_some; ours takes what
    else it has received too (``more_decrypted``), up to what was asked, and the bytes
    come out whole and in order; the server's stream does the same."""
    data = bytes(range(256)) * 4096 * 4  # 4 MiB
    client_end, server_end = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_end, server_context(certs), server_side=True)
    client = trio.SSLStream(
        LargeReads(client_end), tls_client(certs).context, server_hostname="localhost"
    )
    async with trio.open_nursery() as handshakes:
        handshakes.start_soon(server.do_handshake)
        handshakes.start_soon(client.do_handshake)
    stream = TLSStream(client, tls_client(certs))
    got = bytearray()
    sizes = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, data)
        while len(got) < len(data):
            piece = await stream.receive_some(1 << 20)
            assert 0 < len(piece) <= 1 << 20
            sizes.append(len(piece))
            got += piece
    assert got == data
    assert max(sizes) > 16 << 10, sizes  # more than one record at a time
    assert more_decrypted(client, b"", 1 << 20) == b""  # nothing read: nothing added
