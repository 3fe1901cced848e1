"""Our nbds client against real TLS servers (GnuTLS): nbdkit ``--tls=require`` and
qemu-nbd ``--tls-creds``, over Unix sockets and 127.0.0.1; and its refusals."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trio

from blockfuse.block import BlockDevice, Capability
from blockfuse.devices.remote import RemoteDevice, open_remote
from blockfuse.errors import Unreachable
from blockfuse.nbd.uri import parse_uri
from blockfuse.testing import check_block_device
from blockfuse.transport.handshake import HandshakeRefused, TLSFailed

from .conftest import Start
from .mounting import blockfuse_command
from .nbdpeers import Peer
from .tlscerts import Certificates, make_certificates

pytestmark = pytest.mark.interop

SUBJECT = "peer CN=localhost,O=blockfuse tests"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


def nbdkit_tls(certs: Certificates, server: str = "server", *extra: str) -> list[str]:
    return [
        *(
            "nbdkit",
            "-f",
            "-U",
            "{sock}",
            "--tls=require",
            f"--tls-certificates={certs.dir(server)}",
        ),
        *extra,
        *("memory", "64M"),
    ]


def nbds(peer: Peer, certs: Certificates, client: str = "client", export: str = "") -> str:
    """The nbds URI of ``peer`` with the certificates directory ``client``."""
    plain = peer.uri(export)
    scheme, rest = plain.split("://", 1)
    sep = "&" if "?" in rest else "?"
    return f"{scheme.replace('nbd', 'nbds', 1)}://{rest}{sep}tls-certificates={certs.dir(client)}"


async def remote(nursery: trio.Nursery, uri: str) -> RemoteDevice:
    with trio.fail_after(20):
        return await open_remote(nursery, parse_uri(uri))


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
async def test_nbdkit_over_tls_conforms(
    nursery: trio.Nursery, start: Start, certs: Certificates, tcp: bool
) -> None:
    """Over TCP the certificate is checked against 127.0.0.1 (an IP address it lists)."""
    peer = start(nbdkit_tls(certs), tcp=tcp)
    uri = nbds(peer, certs)
    dev = await remote(nursery, uri)
    assert dev.capabilities == {Capability.DISCARD, Capability.WRITE_ZEROES, Capability.EXTENTS}
    assert dev.status()["connection"] == f"connected; tls TLSv1.3, {SUBJECT}"
    assert dev.status()["remote"] == str(parse_uri(uri))
    await dev.aclose()

    async def make() -> BlockDevice:
        return await remote(nursery, uri)

    await check_block_device(make)


@pytest.mark.parametrize("client", ["client", "client-nocert", "client-foreign"])
async def test_nbdkit_verifying_its_peer(
    nursery: trio.Nursery, start: Start, certs: Certificates, client: str
) -> None:
    peer = start(nbdkit_tls(certs, "server", "--tls-verify-peer"))
    if client != "client":
        expected = "requires a client" if client == "client-nocert" else "does not accept our"
        with pytest.raises(
            TLSFailed, match=f"closed the TLS connection at once: most likely it {expected}"
        ):
            await remote(nursery, nbds(peer, certs, client))
        return
    dev = await remote(nursery, nbds(peer, certs, client))
    data = os.urandom(1 << 20)
    buf = bytearray(len(data))
    with trio.fail_after(20):
        await dev.write(8, [data])
        await dev.flush()
        await dev.read(8, [buf])
    assert buf == data
    await dev.aclose()


@pytest.mark.parametrize(
    ("server", "client", "message"),
    [
        ("server", "client-otherca", "certificate is not signed by a CA we trust (unknown CA"),
        ("server-wronghost", "client", "certificate is not for 'localhost' (wrong host name"),
        ("server-expired", "client", "the server's certificate has expired"),
    ],
)
async def test_nbdkit_refusals_say_which(
    nursery: trio.Nursery, start: Start, certs: Certificates, server: str, client: str, message: str
) -> None:
    peer = start(nbdkit_tls(certs, server))
    uri = nbds(peer, certs, client)
    if server == "server-wronghost":
        uri += "&tls-hostname=localhost"  # a Unix socket has no host: name the one to check
    with pytest.raises(TLSFailed) as caught:
        await remote(nursery, uri)
    text = str(caught.value)
    assert (
        text
        == f"unix:{peer.path}: TLS handshake failed: {text.split(': TLS handshake failed: ')[1]}"
    )
    assert message in text and "\n" not in text


async def test_a_unix_socket_checks_the_chain_only_unless_named(
    nursery: trio.Nursery, start: Start, certs: Certificates
) -> None:
    """As libnbd and qemu: no host, no name to check; the CA still has to vouch."""
    peer = start(nbdkit_tls(certs, "server-wronghost"))
    dev = await remote(nursery, nbds(peer, certs))
    assert dev.status()["connection"] == "connected; tls TLSv1.3, peer CN=elsewhere.example"
    await dev.aclose()
    dev = await remote(nursery, nbds(peer, certs) + "&tls-hostname=elsewhere.example")
    await dev.aclose()


async def test_nbds_against_a_plaintext_server_never_falls_back(
    nursery: trio.Nursery, start: Start, certs: Certificates
) -> None:
    peer = start(["nbdkit", "-f", "-U", "{sock}", "memory", "64M"])
    with pytest.raises(HandshakeRefused) as caught:
        await remote(nursery, nbds(peer, certs))
    assert str(caught.value) == (
        f"unix:{peer.path} does not offer TLS (NBD_REP_ERR_POLICY to NBD_OPT_STARTTLS); "
        f"an nbds URI never falls back to plaintext"
    )


async def test_plain_nbd_against_a_tls_only_server(
    nursery: trio.Nursery, start: Start, certs: Certificates
) -> None:
    peer = start(nbdkit_tls(certs))
    with pytest.raises(
        HandshakeRefused, match=r"requires TLS \(NBD_REP_ERR_TLS_REQD\): use an nbds"
    ):
        await remote(nursery, peer.uri())


async def test_a_restarted_nbdkit_is_reconnected_over_tls(
    nursery: trio.Nursery, start: Start, certs: Certificates
) -> None:
    peer = start(nbdkit_tls(certs))
    dev = await remote(nursery, nbds(peer, certs))
    peer.proc.kill()
    peer.proc.wait()
    os.unlink(peer.path or "")
    start(nbdkit_tls(certs))  # the same socket path
    buf = bytearray(4096)
    with trio.fail_after(30):
        await dev.read(0, [buf])
    assert dev.status()["connection"].startswith(
        f"connected; tls TLSv1.3, {SUBJECT}; reconnected 1"
    )
    await dev.aclose()


def qemu_nbd_tls(certs: Certificates, image: Path) -> list[str]:
    creds = f"tls-creds-x509,id=tls0,endpoint=server,dir={certs.dir('server')}"
    argv = ["qemu-nbd", "-t", "-k", "{sock}", "-x", "disk", "-f", "raw", "--object", creds]
    return [*argv, "--tls-creds", "tls0", str(image)]


async def test_qemu_nbd_over_tls(
    nursery: trio.Nursery, start: Start, certs: Certificates, short_tmp: Path
) -> None:
    """qemu's x509 credentials verify the client by default: a client certificate is needed."""
    image = short_tmp / "disk.img"
    image.write_bytes(bytes(4 << 20))
    peer = start(qemu_nbd_tls(certs, image))
    with pytest.raises(TLSFailed, match="most likely it requires a client certificate"):
        await remote(nursery, nbds(peer, certs, "client-nocert", "disk"))
    dev = await remote(nursery, nbds(peer, certs, "client", "disk"))
    assert dev.status()["connection"] == f"connected; tls TLSv1.3, {SUBJECT}"
    data = os.urandom(1 << 20)
    with trio.fail_after(20):
        await dev.write(2048, [data])
        await dev.flush()
    assert image.read_bytes()[1 << 20 : 2 << 20] == data
    await dev.aclose()


def test_ls_over_tls(start: Start, certs: Certificates) -> None:
    peer = start(nbdkit_tls(certs))
    run = subprocess.run(
        blockfuse_command("ls", nbds(peer, certs)), capture_output=True, text=True, timeout=60
    )
    assert (run.returncode, run.stdout, run.stderr) == (0, '""\t64 MiB\t\n', "")
    unverified = nbds(peer, certs, "client-otherca") + "&tls-verify-peer=false"
    run = subprocess.run(
        blockfuse_command("ls", unverified), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and run.stdout == '""\t64 MiB\t\n'
    assert run.stderr.endswith(
        f" blockfuse: warning: unix:{peer.path}: tls-verify-peer=false: the server's "
        f"certificate is not checked, so anyone on the way can pose as the server\n"
    )
    assert run.stderr.count("\n") == 1
    run = subprocess.run(
        blockfuse_command("ls", nbds(peer, certs, "client-otherca")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith(f"blockfuse: unix:{peer.path}: TLS handshake failed: the server")
    assert run.stderr.count("\n") == 1


def test_ls_plain_against_a_tls_only_server(start: Start, certs: Certificates) -> None:
    peer = start(nbdkit_tls(certs))
    run = subprocess.run(
        blockfuse_command("ls", peer.uri()), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1
    assert run.stderr == (
        f"blockfuse: unix:{peer.path} requires TLS (NBD_REP_ERR_TLS_REQD): use an nbds:// or "
        f"nbds+unix:// URI\n"
    )


async def test_a_server_gone_during_tls_is_a_lost_connection(
    nursery: trio.Nursery, start: Start, certs: Certificates
) -> None:
    """nbdkit killed with the device open: requests fail (then reconnect), never hang."""
    peer = start(nbdkit_tls(certs))
    dev = await remote(nursery, nbds(peer, certs))
    peer.proc.kill()
    peer.proc.wait()
    with trio.fail_after(40), pytest.raises(Unreachable, match="still unreachable after 5"):
        await dev.read(0, [bytearray(4096)])
    await dev.aclose()
