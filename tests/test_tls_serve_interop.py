"""Real TLS clients (GnuTLS: libnbd's nbdinfo, nbdcopy, nbdsh; qemu-img) against our
server, and ``blockfuse serve`` / ``mount --serve`` with ``--tls`` as users run them.

Our server runs in this process for the tools (each tool a process killed by its PID if
it outlives the test), or as a ``blockfuse serve`` / ``blockfuse mount`` process stopped
by its PID.  Note libnbd checks a server's certificate only when it has a host name to
check it against: over a Unix socket it encrypts but does not verify, so the wrong-CA
cases run over 127.0.0.1 (qemu takes ``tls-hostname`` on a Unix socket)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio

from blockfuse.devices.memory import MemoryDevice
from blockfuse.nbd import constants as c

from .hostile_client import RawClient, info_data, option
from .mounting import mounted
from .servekit import Served, blockfuse, export_of, run, served, serving
from .test_tls_serve import nbds, server_tls
from .tlscerts import Certificates, make_certificates

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


def image(path: Path, size: int = SIZE) -> Path:
    """Random data with a hole in the middle."""
    with open(path, "wb") as f:
        f.write(os.urandom(size // 4))
        f.seek(size // 2)
        f.write(os.urandom(size // 4))
        f.truncate(size)
    return path


def qemu_opts(s: Served, certs: Certificates, client: str = "client") -> list[str]:
    """qemu-img's arguments for our export over TLS: the credentials object, the image."""
    a = s.address
    where = (
        f"file.server.type=unix,file.server.path={a.path},file.tls-hostname=localhost"
        if a.path is not None
        else f"file.server.type=inet,file.server.host={a.host},file.server.port={a.port}"
    )
    return [
        *("--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certs.dir(client)}"),
        *("--image-opts",
          f"driver=raw,file.driver=nbd,{where},file.export=disk,file.tls-creds=tls0"),
    ]  # fmt: skip


def local_files(uri: str, *script: str) -> list[str]:
    """nbdsh ``-c`` scripts that connect to an nbds ``uri`` naming local files."""
    return ["h.set_uri_allow_local_file(True)", f"h.connect_uri({uri!r})", *script]


async def nbdsh_tls(uri: str, *script: str) -> str:
    argv = ["nbdsh"]
    for part in local_files(uri, *script):
        argv += ["-c", part]
    return (await run(*argv, system_python=True)).stdout.decode()


# --- libnbd and qemu against our server ------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
async def test_nbdinfo_nbdsh_and_qemu_img_over_tls(
    short_tmp: Path, certs: Certificates, tcp: bool
) -> None:
    img = image(short_tmp / "in.raw")
    device = MemoryDevice(SIZE)
    async with serving([export_of(device)], short_tmp, tls=server_tls(certs), tcp=tcp) as s:
        uri = nbds(s, certs)
        info = json.loads((await run("nbdinfo", "--json", uri)).stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == SIZE
        await run("nbdcopy", str(img), uri)
        out = await nbdsh_tls(
            uri,
            "print(h.get_tls_negotiated())",
            "h.pwrite(b'over tls', 4096)",
            "print(h.pread(8, 4096))",
        )
        assert out.split() == ["True", "bytearray(b'over", "tls')"]
        with open(img, "r+b") as f:
            f.seek(4096)
            f.write(b"over tls")
        qemu = await run("qemu-img", "info", "--output=json", *qemu_opts(s, certs))
        assert json.loads(qemu.stdout)["virtual-size"] == SIZE
        local = f"driver=raw,file.driver=file,file.filename={img}"
        same = await run("qemu-img", "compare", *qemu_opts(s, certs), local)
        assert b"Images are identical" in same.stdout


async def test_nbdcopy_both_ways_over_tls_with_client_certificates(
    short_tmp: Path, certs: Certificates
) -> None:
    img = image(short_tmp / "in.raw")
    async with serving(
        [export_of(MemoryDevice(SIZE))], short_tmp, tls=server_tls(certs, verify=True)
    ) as s:
        uri = nbds(s, certs)
        await run("nbdcopy", "--flush", str(img), uri)
        await run("nbdcopy", uri, str(short_tmp / "out.raw"))
        await run("cmp", str(img), str(short_tmp / "out.raw"))
        await run("nbdcopy", "--connections=4", uri, str(short_tmp / "out4.raw"))
        await run("cmp", str(img), str(short_tmp / "out4.raw"))


# --- refusals ----------------------------------------------------------------------------------


async def test_plaintext_clients_of_a_tls_only_server_get_tls_reqd(
    short_tmp: Path, certs: Certificates
) -> None:
    async with serving([export_of(MemoryDevice(MiB))], short_tmp, tls=server_tls(certs)) as s:
        out = await run("nbdinfo", s.uri(), check=False)
        lines = out.stderr.decode().splitlines()
        assert out.returncode == 1 and "server replied with error to opt_go request" in lines[0]
        # libnbd 1.14 says ENOTSUP: what it got was this (the options nbdinfo sent)
        async with await RawClient.connect(str(s.address.path)) as raw:
            await raw.greet()
            for data in (option(c.Opt.STRUCTURED_REPLY), option(c.Opt.GO, info_data("disk"))):
                [reply] = await raw.ask(data)
                assert reply.rtype == c.Rep.ERR_TLS_REQD
        ls = await trio.to_thread.run_sync(blockfuse, "ls", s.uri(""))
        assert ls.returncode == 1
        assert ls.stderr == (
            f"blockfuse: unix:{s.address.path} requires TLS (NBD_REP_ERR_TLS_REQD): use an "
            f"nbds:// or nbds+unix:// URI\n"
        )
        listed = await run("nbdinfo", "--list", s.uri(""), check=False)
        assert listed.returncode == 1 and b"list request" in listed.stderr


@pytest.mark.parametrize(
    ("client", "logged"),
    [
        ("client-nocert", "the client sent no certificate (--tls-verify-peer asks for one)"),
        ("client-foreign", "the client's certificate was refused"),
    ],
)
async def test_verify_peer_refuses_libnbd_without_a_good_client_certificate(
    short_tmp: Path,
    certs: Certificates,
    caplog: pytest.LogCaptureFixture,
    client: str,
    logged: str,
) -> None:
    tls = server_tls(certs, verify=True)
    async with serving([export_of(MemoryDevice(MiB))], short_tmp, tls=tls) as s:
        with caplog.at_level(logging.WARNING):
            out = await run("nbdinfo", "--size", nbds(s, certs, client), check=False)
        assert out.returncode == 1, out
        assert f"dropped: TLS handshake failed: {logged}" in caplog.text
        assert (await run("nbdinfo", "--size", nbds(s, certs))).stdout.strip() == str(MiB).encode()


async def test_clients_that_do_not_trust_our_ca_refuse_us(
    short_tmp: Path, certs: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(
        [export_of(MemoryDevice(MiB))], short_tmp, tls=server_tls(certs), tcp=True
    ) as s:
        with caplog.at_level(logging.WARNING):
            out = await run("nbdinfo", "--size", nbds(s, certs, "client-otherca"), check=False)
            assert out.returncode == 1 and b"certificate verification" in out.stderr
            qemu = await run(
                "qemu-img", "info", *qemu_opts(s, certs, "client-otherca"), check=False
            )
            assert qemu.returncode == 1 and b"known issuer" in qemu.stderr
        # qemu checks our certificate after the TLS handshake and then hangs up: only
        # libnbd's refusal is a failed TLS handshake for the server
        assert "TLS handshake failed: the client broke off the connection" in caplog.text
        assert (await run("nbdinfo", "--size", nbds(s, certs))).stdout.strip() == str(MiB).encode()


# --- blockfuse serve and mount --serve --------------------------------------------------------


def key_open_to_others(certs: Certificates, where: Path) -> Path:
    copy = where / "server-certs"
    shutil.copytree(certs.dir("server"), copy)
    (copy / "server-key.pem").chmod(0o644)
    return copy


def test_serve_refuses_unusable_tls_settings_in_one_line(
    short_tmp: Path, certs: Certificates
) -> None:
    loose = key_open_to_others(certs, short_tmp)
    no_ca = short_tmp / "no-ca"
    shutil.copytree(certs.dir("server"), no_ca)
    (no_ca / "ca-cert.pem").unlink()
    garbage = short_tmp / "garbage"
    shutil.copytree(certs.dir("server"), garbage)
    (garbage / "server-cert.pem").write_text("not a certificate\n")
    key = loose / "server-key.pem"
    cases = [
        (["--tls-certificates", str(loose)],
         f"{key} is open to group or others (mode 0644); a private key must not be: chmod 600 "
         f"{key}"),
        (["--tls-certificates", str(no_ca), "--tls-verify-peer"],
         f"{no_ca}/ca-cert.pem is missing (--tls-verify-peer needs ca-cert.pem in {no_ca})"),
        (["--tls-certificates", str(garbage)],
         f"{garbage}/server-cert.pem, {garbage}/server-key.pem: not a usable certificate and "
         f"key"),
        (["--tls-certificates", str(short_tmp / "nowhere")],
         f"--tls-certificates {short_tmp}/nowhere: no such directory"),
        (["--tls=require"], "--tls=require needs --tls-certificates DIR"),
        (["--tls=off", "--tls-verify-peer"], "--tls-verify-peer needs --tls=on or --tls=require"),
    ]  # fmt: skip
    for options, message in cases:
        out = blockfuse(
            "serve", "-d", "disk=mem(1M)", "--socket", "s.sock", *options, cwd=short_tmp
        )
        assert out.returncode == 2, (options, out.stderr)
        assert out.stderr.startswith(f"blockfuse: {message}") and out.stderr.count("\n") == 1
        assert not (short_tmp / "s.sock").exists()


def test_serve_with_tls_required_shows_tls_in_its_banner_and_status(
    short_tmp: Path, certs: Certificates
) -> None:
    args = ["-d", "disk=mem(8M)", "--socket", "s.sock", "--listen", "0.0.0.0:0", "--tls=require",
            "--tls-certificates", certs.dir("server"), "--tls-verify-peer"]  # fmt: skip
    with served(short_tmp, *args) as server:
        banner = server.output()
        assert "warning" not in banner  # reachable from elsewhere, but TLS only
        sock = short_tmp / "s.sock"
        assert f"nbds+unix:///disk?socket={sock}" in banner
        uri = f"nbds+unix:///disk?socket={sock}&tls-certificates={certs.dir('client')}"
        held = subprocess.Popen(
            ["nbdsh", *[a for part in local_files(uri, "import time; time.sleep(60)")
                        for a in ("-c", part)]],
            env={**os.environ, "PATH": "/usr/bin:" + os.environ["PATH"]},
        )  # fmt: skip
        try:
            deadline = 30.0
            while True:
                report = json.loads(blockfuse("status", "--json", str(short_tmp / "s.ctl")).stdout)
                if report["server"]["clients"] and report["server"]["clients"][0]["export"]:
                    break
                deadline -= 0.05
                assert deadline > 0 and held.poll() is None, server.output()
                time.sleep(0.05)
            assert report["server"]["tls"] == "require"
            assert report["server"]["clients"][0]["tls"] == "TLSv1.3"
            assert report["server"]["clients"][0]["client_certificate"] == "CN=blockfuse client"
            text = blockfuse("status", str(short_tmp / "s.ctl")).stdout
            assert "; tls require; 1 connection\n" in text
            assert ": export 'disk', tls TLSv1.3, client CN=blockfuse client" in text
            assert "PRIVATE" not in text + json.dumps(report) and "BEGIN" not in text
        finally:
            held.send_signal(signal.SIGKILL)
            held.wait()
        plain = subprocess.run(["nbdinfo", f"nbd+unix:///disk?socket={sock}"],
                               capture_output=True, timeout=60, check=False)  # fmt: skip
        assert plain.returncode == 1
        assert server.stop() == 0


@pytest.mark.e2e
def test_mount_serve_over_tls_writes_reach_the_flat_file(
    short_tmp: Path, certs: Certificates
) -> None:
    img = short_tmp / "disk.img"
    img.write_bytes(bytes(16 * MiB))
    sock = short_tmp / "m.sock"
    extra = ["--serve", str(sock), "--tls-certificates", certs.dir("server")]
    with mounted(short_tmp / "mnt", [f"disk={img}"], extra) as m:
        assert f"nbds+unix:///disk?socket={sock}" in m.output()
        uri = f"nbds+unix:///disk?socket={sock}&tls-certificates={certs.dir('client')}"
        env = {**os.environ, "PATH": "/usr/bin:" + os.environ["PATH"]}
        argv = ["nbdsh"]
        for part in local_files(uri, "h.pwrite(b'through tls', 54321)", "h.flush()"):
            argv += ["-c", part]
        subprocess.run(argv, env=env, timeout=60, check=True)
        with open(m.path("disk"), "rb") as f:
            f.seek(54321)
            assert f.read(11) == b"through tls"
        plain = subprocess.run(["nbdinfo", f"nbd+unix:///disk?socket={sock}"],
                               capture_output=True, timeout=60, check=False)  # fmt: skip
        assert plain.returncode == 1
        assert m.stop() == 0
    assert img.read_bytes()[54321 : 54321 + 11] == b"through tls"


def test_mount_refuses_tls_without_serve(short_tmp: Path, certs: Certificates) -> None:
    out = blockfuse(
        "mount", str(short_tmp / "mnt"), "-d", "disk=mem(1M)", "--tls-certificates",
        certs.dir("server"), cwd=short_tmp,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr == "blockfuse: --tls needs --serve ADDR (it is the NBD server's)\n"
