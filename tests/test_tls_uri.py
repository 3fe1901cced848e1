"""nbds URIs as libnbd writes them, their TLS parameters, and the certificate files a spec
checks before anything connects."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from blockfuse.cli import main
from blockfuse.nbd.uri import Address, BadURI, TLSOptions, parse_uri
from blockfuse.spec import SpecError, compile_spec
from blockfuse.transport.handshake import TLSFailed
from blockfuse.transport.tls import client_context

from .conftest import require_tool
from .tlscerts import Certificates, make_certificates


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize(
    ("uri", "address"),
    [
        ("nbds://example.com/disk", Address("disk", host="example.com", tls=TLSOptions())),
        (
            "nbds://127.0.0.1:1234/x?tls-certificates=/etc/tls&tls-hostname=nbd.example",
            Address(
                "x", host="127.0.0.1", port=1234, tls=TLSOptions("/etc/tls", True, "nbd.example")
            ),
        ),
        (
            "nbds+unix:///a%20b?socket=/run/s&tls-certificates=/c&tls-verify-peer=false",
            Address("a b", socket="/run/s", tls=TLSOptions("/c", verify_peer=False)),
        ),
        ("nbds+unix:///?socket=/s&tls-type=x509", Address("", socket="/s", tls=TLSOptions())),
        ("nbds://h/?tls-verify-peer=0", Address("", host="h", tls=TLSOptions(verify_peer=False))),
        ("nbds://h/?tls-verify-peer=1", Address("", host="h", tls=TLSOptions())),
    ],
)
def test_nbds_uris(uri: str, address: Address) -> None:
    assert parse_uri(uri) == address
    assert parse_uri(str(address)) == address


def test_the_name_a_certificate_must_carry() -> None:
    assert parse_uri("nbds://nbd.example:99/x").tls_hostname == "nbd.example"
    assert parse_uri("nbds://[::1]/x").tls_hostname == "::1"
    assert parse_uri("nbds://h/x?tls-hostname=other.example").tls_hostname == "other.example"
    assert parse_uri("nbds+unix:///x?socket=/s").tls_hostname is None  # the chain only
    assert parse_uri("nbds+unix:///x?socket=/s&tls-hostname=n").tls_hostname == "n"
    assert parse_uri("nbds://h/x?tls-verify-peer=false").tls_hostname == "h"  # SNI only
    assert parse_uri("nbd://h/x").tls_hostname is None and parse_uri("nbd://h/x").tls is None


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("nbd://h/x?tls-certificates=/c", r"tls-certificates= needs TLS: write nbds://"),
        ("nbd+unix:///x?socket=/s&tls-hostname=n", r"needs TLS: write nbds\+unix://"),
        ("nbds://h/x?tls-type=psk", "X.509 certificates only"),
        ("nbds://h/x?tls-psk-file=/k", r"\?tls-psk-file= is not supported"),
        ("nbds://alice@h/x", "TLS-PSK"),
        ("nbds://h/x?tls-verify-peer=maybe", "bad tls-verify-peer='maybe'"),
        ("nbds://h/x?tls-certificates=", "needs a directory"),
        ("nbds://h/x?tls-hostname=", "needs a name"),
        ("nbds+unix:///x?socket=/s&cache=on", r"takes no \?cache= parameter"),
        ("nbds://h/x?socket=/s", r"\?socket= is for nbds\+unix"),
        ("nbds+unix:///x?socket=/a&socket=/b", r"\?socket= is given twice"),
        ("nbds+unix://h/x?socket=/s", "takes no host"),
        ("nbds+vsock:///x", "not supported"),
        ("nbds:///x", "needs a host"),
    ],
)
def test_bad_nbds_uris(uri: str, match: str) -> None:
    with pytest.raises(BadURI, match=match):
        parse_uri(uri)


def test_a_spec_loads_the_certificates_before_anything_connects(
    certs: Certificates, tmp_path: Path
) -> None:
    good = compile_spec(f"nbds://127.0.0.1/disk?tls-certificates={certs.dir('client')}")
    assert good.kind == "nbd"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ca-cert.pem").write_text("not a certificate\n")
    half = tmp_path / "half"
    half.mkdir()
    (half / "client-cert.pem").write_bytes(
        Path(certs.dir("client"), "client-cert.pem").read_bytes()
    )
    for directory, match in [
        (tmp_path / "none", "no such directory"),
        (broken, "ca-cert.pem: not a usable CA certificate"),
        (half, "client-key.pem is missing"),
    ]:
        with pytest.raises(SpecError, match=match):
            compile_spec(f"nbds://h/x?tls-certificates={directory}")


def test_an_encrypted_key_is_refused_not_prompted_for(certs: Certificates, tmp_path: Path) -> None:
    """OpenSSL would ask for the password on the terminal (a mount would hang there)."""
    client = Path(certs.dir("client"))
    (tmp_path / "client-cert.pem").write_bytes((client / "client-cert.pem").read_bytes())
    key, encrypted = str(client / "client-key.pem"), str(tmp_path / "client-key.pem")
    openssl = require_tool("openssl", "openssl")
    subprocess.run(
        [openssl, "pkey", "-in", key, "-aes256", "-passout", "pass:secret", "-out", encrypted],
        check=True,
        timeout=60,
    )
    with pytest.raises(TLSFailed, match=r"client-key\.pem is encrypted") as caught:
        client_context(TLSOptions(str(tmp_path)))
    assert "secret" not in str(caught.value)


def test_ls_refuses_a_bad_nbds_uri(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", "nbds://h/?tls-type=psk"]) == 2
    assert "X.509 certificates only" in capsys.readouterr().err
