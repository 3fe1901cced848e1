"""X.509 certificates for the TLS tests, made with ``openssl`` (ECDSA P-256, quick).

Directories in the layout nbdkit, qemu and libnbd read (``ca-cert.pem`` and
``server-cert.pem``/``server-key.pem`` for a server, ``client-cert.pem``/
``client-key.pem`` for a client)::

    server/            the test CA's server certificate for localhost and 127.0.0.1
    server-wronghost/  the test CA's, for elsewhere.example only
    server-expired/    the test CA's for localhost, expired in 2020
    client/            the test CA, and a client certificate it signed
    client-nocert/     the test CA only
    client-otherca/    another CA only (the servers' CA is unknown to it)
    client-foreign/    the test CA, and a client certificate another CA signed

An expired certificate needs dates in the past, which ``openssl x509 -days`` cannot
give; ``openssl ca`` takes them (``-startdate``/``-enddate``) with a throwaway database.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .conftest import require_tool

CA_EXTENSIONS = ["basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign"]
LOCALHOST = "DNS:localhost,IP:127.0.0.1"


@dataclass(frozen=True)
class Certificates:
    root: Path

    def dir(self, name: str) -> str:
        return str(self.root / name)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(
        [require_tool("openssl", "openssl"), *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=60,
    )


def make_ca(work: Path, name: str, subject: str) -> None:
    extensions = [a for e in CA_EXTENSIONS for a in ("-addext", e)]
    openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
        *("-keyout", f"{name}-key.pem", "-out", f"{name}-cert.pem", "-days", "30"),
        *("-subj", subject, *extensions),
        cwd=work,
    )


def leaf_request(work: Path, name: str, subject: str, san: str, usage: str) -> None:
    openssl(
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
        *("-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", subject),
        cwd=work,
    )
    (work / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\nsubjectAltName={san}\n"
    )


def sign(work: Path, name: str, ca: str) -> None:
    openssl(
        *("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem"),
        *("-CAkey", f"{ca}-key.pem", "-CAcreateserial", "-out", f"{name}-cert.pem"),
        *("-days", "30", "-extfile", f"{name}.ext"),
        cwd=work,
    )


def sign_expired(work: Path, name: str, ca: str) -> None:
    (work / "index.txt").write_text("")
    (work / "serial").write_text("1000\n")
    (work / "ca.cnf").write_text(
        "[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\nnew_certs_dir = .\n"
        "serial = serial\ndefault_md = sha256\npolicy = any\n[any]\ncommonName = supplied\n"
        "organizationName = optional\n"
    )
    openssl(
        *("ca", "-batch", "-config", "ca.cnf", "-cert", f"{ca}-cert.pem", "-keyfile"),
        *(f"{ca}-key.pem", "-in", f"{name}.csr", "-out", f"{name}-cert.pem", "-notext"),
        *("-startdate", "20200101000000Z", "-enddate", "20200201000000Z"),
        *("-extfile", f"{name}.ext"),
        cwd=work,
    )


def layout(work: Path, root: Path, name: str, files: dict[str, str]) -> None:
    target = root / name
    target.mkdir()
    for dest, src in files.items():
        shutil.copy(work / src, target / dest)
        (target / dest).chmod(0o600 if dest.endswith("key.pem") else 0o644)


def make_certificates(root: Path) -> Certificates:
    work = root / "work"
    work.mkdir()
    make_ca(work, "ca", "/O=blockfuse tests/CN=blockfuse test CA")
    make_ca(work, "otherca", "/O=elsewhere/CN=another CA")
    leaf_request(work, "server", "/O=blockfuse tests/CN=localhost", LOCALHOST, "serverAuth")
    sign(work, "server", "ca")
    leaf_request(work, "wrong", "/CN=elsewhere.example", "DNS:elsewhere.example", "serverAuth")
    sign(work, "wrong", "ca")
    leaf_request(work, "expired", "/O=blockfuse tests/CN=localhost", LOCALHOST, "serverAuth")
    sign_expired(work, "expired", "ca")
    leaf_request(work, "client", "/CN=blockfuse client", "DNS:client.example", "clientAuth")
    sign(work, "client", "ca")
    leaf_request(work, "foreign", "/CN=foreign client", "DNS:foreign.example", "clientAuth")
    sign(work, "foreign", "otherca")
    for name, files in [
        ("server", role("server", "server")),
        ("server-wronghost", role("server", "wrong")),
        ("server-expired", role("server", "expired")),
        ("client", role("client", "client")),
        ("client-nocert", {"ca-cert.pem": "ca-cert.pem"}),
        ("client-otherca", {"ca-cert.pem": "otherca-cert.pem"}),
        ("client-foreign", role("client", "foreign")),
    ]:
        layout(work, root, name, files)
    return Certificates(root)


def role(kind: str, name: str) -> dict[str, str]:
    """The files of a ``kind`` (server or client) directory: the test CA, ``name``'s pair."""
    return {
        "ca-cert.pem": "ca-cert.pem",
        f"{kind}-cert.pem": f"{name}-cert.pem",
        f"{kind}-key.pem": f"{name}-key.pem",
    }
