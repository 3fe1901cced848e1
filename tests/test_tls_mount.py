"""nbds remotes through a real mount: nbdkit and qemu-nbd over TLS (mount, write, cmp), a
mirror of an nbds primary onto a local sparse file, and mounts refused in one line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .conftest import Start
from .mounting import attr, blockfuse_command, mounted, wait_attr
from .test_nbd_mount import time_limit  # noqa: F401  (autouse: a hung mount fails the test)
from .test_tls_interop import SUBJECT, nbds
from .tlscerts import Certificates, make_certificates

pytestmark = pytest.mark.e2e

SIZE = 64 << 20


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


def cmp(a: Path, b: Path) -> None:
    subprocess.run(["cmp", str(a), str(b)], check=True, timeout=120)


def write_through(flat: Path, data: Path, seek_mib: int) -> None:
    args = [f"if={data}", f"of={flat}", "bs=1M", f"seek={seek_mib}", "conv=notrunc,fsync"]
    subprocess.run(["dd", *args, "status=none"], check=True, timeout=120)


def nbdkit(certs: Certificates, *args: str) -> list[str]:
    tls = ["--tls=require", f"--tls-certificates={certs.dir('server')}"]
    return ["nbdkit", "-f", "-U", "{sock}", *tls, *args]


@pytest.mark.parametrize("verify_peer", [False, True], ids=["plain-tls", "tls-verify-peer"])
def test_nbdkit_memory_over_tls_mount_write_cmp(
    short_tmp: Path, certs: Certificates, start: Start, verify_peer: bool
) -> None:
    extra = ["--tls-verify-peer"] if verify_peer else []
    peer = start(nbdkit(certs, *extra, "memory", "64M"))
    data = short_tmp / "data"
    data.write_bytes(os.urandom(8 << 20))
    expected = short_tmp / "expected"
    with open(expected, "wb") as f:
        f.truncate(SIZE)
        f.seek(20 << 20)
        f.write(data.read_bytes())
    with mounted(short_tmp / "mnt", [f"disk={nbds(peer, certs)}"]) as m:
        flat = m.path("disk")
        assert flat.stat().st_size == SIZE
        assert attr(m, "connection") == f"connected; tls TLSv1.3, {SUBJECT}"
        write_through(flat, data, 20)
        cmp(flat, expected)
        assert m.stop() == 0, m.output()
    assert "Traceback" not in m.output()


def test_nbdkit_verifying_its_peer_refuses_a_mount_without_a_client_certificate(
    short_tmp: Path, certs: Certificates, start: Start
) -> None:
    peer = start(nbdkit(certs, "--tls-verify-peer", "memory", "64M"))
    (short_tmp / "mnt").mkdir()
    run = subprocess.run(
        blockfuse_command(
            "mount", str(short_tmp / "mnt"), "-d", f"disk={nbds(peer, certs, 'client-nocert')}"
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1, run.stderr
    assert run.stderr.count("\n") == 1, run.stderr
    assert "closed the TLS connection at once: most likely it requires a client certificate" in (
        run.stderr
    )


@pytest.mark.parametrize(
    ("server_dir", "message"),
    [
        (None, "does not offer TLS (NBD_REP_ERR_POLICY to NBD_OPT_STARTTLS)"),
        ("server-expired", "TLS handshake failed: the server's certificate has expired"),
    ],
    ids=["plaintext-server", "expired"],
)
def test_a_refused_nbds_mount_fails_in_one_line(
    short_tmp: Path, certs: Certificates, start: Start, server_dir: str | None, message: str
) -> None:
    tls = (
        []
        if server_dir is None
        else ["--tls=require", f"--tls-certificates={certs.dir(server_dir)}"]
    )
    peer = start(["nbdkit", "-f", "-U", "{sock}", *tls, "memory", "64M"])
    (short_tmp / "mnt").mkdir()
    run = subprocess.run(
        blockfuse_command("mount", str(short_tmp / "mnt"), "-d", f"disk={nbds(peer, certs)}"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert message in run.stderr


def test_qemu_nbd_over_tls_mount_write_cmp(
    short_tmp: Path, certs: Certificates, start: Start
) -> None:
    image = short_tmp / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
        f.seek(1 << 20)
        f.write(os.urandom(1 << 20))
    creds = f"tls-creds-x509,id=tls0,endpoint=server,dir={certs.dir('server')}"
    argv = ["qemu-nbd", "-t", "-k", "{sock}", "-x", "disk", "-f", "raw", "--object", creds]
    peer = start([*argv, "--tls-creds", "tls0", str(image)])
    data = short_tmp / "data"
    data.write_bytes(os.urandom(3 << 20))
    with mounted(short_tmp / "mnt", [f"disk={nbds(peer, certs, export='disk')}"]) as m:
        flat = m.path("disk")
        cmp(flat, image)
        write_through(flat, data, 9)
        assert image.read_bytes()[9 << 20 : 12 << 20] == data.read_bytes()
        cmp(flat, image)
        assert attr(m, "connection") == f"connected; tls TLSv1.3, {SUBJECT}"
        assert m.stop() == 0, m.output()


def test_a_mirror_of_an_nbds_primary(short_tmp: Path, certs: Certificates, start: Start) -> None:
    primary, secondary, state = short_tmp / "p.img", short_tmp / "s.img", short_tmp / "map"
    with open(primary, "wb") as f:  # data, a hole, data
        f.write(os.urandom(8 << 20))
        f.seek(24 << 20)
        f.write(os.urandom(8 << 20))
    peer = start(nbdkit(certs, "file", str(primary)))
    spec = f"disk=mirror({nbds(peer, certs)}, sparse({secondary}), state={state}, chunk=1M)"
    with mounted(short_tmp / "mnt", [spec]) as m:
        wait_attr(m, "state", lambda v: v == "synced", timeout=60)
        with open(m.path("disk"), "r+b") as f:  # a write after the copy goes to both
            f.write(b"written over TLS")
            f.flush()
            os.fsync(f.fileno())
        assert m.stop() == 0, m.output()
    cmp(primary, secondary)
    assert primary.read_bytes()[:16] == b"written over TLS"
