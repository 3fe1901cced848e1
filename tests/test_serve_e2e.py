"""``blockfuse serve`` and ``mount --serve`` as users run them: processes, signals, socket
activation, the control socket, a mirror pivoted while served, a filesystem through
nbdfuse and a loop device, fio's NBD engine on four connections."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import require_tool
from .mounting import fs_mounted, loop_device, mounted, run
from .nbdpeers import Peer
from .servekit import READY, blockfuse, served
from .timing import time_limit

pytestmark = pytest.mark.e2e
limit = time_limit(300)

MiB = 1 << 20


def nbdsh(uri: str, script: str) -> str:
    env = {**os.environ, "PATH": "/usr/bin:" + os.environ["PATH"]}
    out = subprocess.run(["nbdsh", "-u", uri, "-c", script], capture_output=True, text=True,
                         env=env, timeout=60, check=True)  # fmt: skip
    return out.stdout


def status(control: Path) -> dict[str, object]:
    out = blockfuse("status", "--json", str(control))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_serve_lists_reports_and_stops_at_sigterm_after_the_requests_in_flight(
    short_tmp: Path,
) -> None:
    slow = ["nbdkit", "-f", "-U", "{sock}", "--filter=delay", "memory", "16M", "delay-read=3"]
    with (
        Peer(slow, short_tmp) as peer,
        served(
            short_tmp, "-d", f"slow={peer.uri()}", "-d", "mem=mem(8M)", "--socket", "vm1.sock"
        ) as server,
    ):
        sock, control = short_tmp / "vm1.sock", short_tmp / "vm1.ctl"
        assert "nbd+unix:///slow?socket=" in server.output()
        listed = subprocess.run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}"],
                                capture_output=True, check=True, timeout=60)  # fmt: skip
        assert [e["export-name"] for e in json.loads(listed.stdout)["exports"]] == ["slow", "mem"]
        lines = blockfuse("status", str(control)).stdout.splitlines()
        assert lines[0].startswith("slow: nbd, 16 MiB") and lines[1].startswith("  connected")
        assert lines[2].startswith("mem: memory, 8 MiB  mem(8M)")
        assert lines[3] == f"serving nbd+unix:///?socket={sock}; 0 connections"
        report = status(control)
        assert report["source"] == "server"
        assert report["devices"][1] == {  # type: ignore[index]
            "name": "mem", "kind": "memory", "spec": "mem(8M)", "size": 8 * MiB,
            "sector_size": 512, "read_only": False, "io_errors": 0,
        }  # fmt: skip
        env = {**os.environ, "PATH": "/usr/bin:" + os.environ["PATH"]}
        reader = subprocess.Popen(
            ["nbdsh", "-u", f"nbd+unix:///slow?socket={sock}", "-c",
             "print(len(h.pread(4096, 0)))"],
            stdout=subprocess.PIPE, env=env,
        )  # fmt: skip
        try:
            time.sleep(1)  # the read is in flight: nbdkit answers it after 3 s
            started = time.monotonic()
            assert server.stop(signal.SIGTERM) == 0, server.output()
            assert reader.communicate(timeout=30)[0].strip() == b"4096"  # answered, not cut
            assert time.monotonic() - started < 10
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
        assert not sock.exists() and not control.exists()
        assert "stopped serving" in server.output()


def test_socket_activation_over_unix_and_tcp(short_tmp: Path) -> None:
    require_tool("nbdinfo", "libnbd-bin")
    command = ["nbdinfo", "--size", "--", "[", *serve_argv("-d", "disk=mem(3M)"), "]"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=short_tmp)
    assert out.returncode == 0 and out.stdout.strip() == str(3 * MiB), out.stderr
    with Peer(serve_argv("-d", "disk=mem(5M)"), short_tmp, tcp=True) as peer:
        uri = peer.uri("disk")
        deadline = time.monotonic() + 30
        while True:  # the listener was bound before the server started: connections wait
            out = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                                 timeout=60)  # fmt: skip
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert out.stdout.strip() == str(5 * MiB), (out.stderr, peer.log())
        assert "warning" not in peer.log()  # 127.0.0.1 draws none


def serve_argv(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "blockfuse.cli", "serve", *args]


def test_a_served_mirror_takes_writes_while_it_copies_then_pivots(short_tmp: Path) -> None:
    primary = short_tmp / "primary.img"
    primary.write_bytes(os.urandom(32 * MiB))
    spec = "mirror(primary.img, sparse(secondary.img), state=disk.map, rate=16M)"
    with served(short_tmp, "-d", f"disk={spec}", "--socket", "vm1.sock",
                "--control", "ctl") as server:  # fmt: skip
        control, uri = short_tmp / "ctl", f"nbd+unix:///disk?socket={short_tmp / 'vm1.sock'}"
        assert status(control)["devices"][0]["state"] == "copying"  # type: ignore[index]
        refused = blockfuse("pivot", str(control), "disk")
        assert refused.returncode == 1 and "pivot once it is synced" in refused.stderr
        commands = []
        for i in range(16):
            commands += ["-c", f"aio_write -P {0x30 + i} {i * 2 * MiB + 777} 100k"]
        subprocess.run(["qemu-io", "-f", "raw", *commands, "-c", "aio_flush", uri],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        deadline = time.monotonic() + 60
        while status(control)["devices"][0]["state"] != "synced":  # type: ignore[index]
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.2)
        pivoted = blockfuse("pivot", str(control), "disk")
        assert pivoted.returncode == 0 and "disk is pivoted" in pivoted.stderr, pivoted.stderr
        exported = short_tmp / "exported.raw"
        subprocess.run(["nbdcopy", uri, str(exported)], check=True, timeout=60)
        assert server.stop() == 0, server.output()
    data = primary.read_bytes()
    assert data[777 : 777 + 100 * 1024] == b"\x30" * 100 * 1024
    assert (short_tmp / "secondary.img").read_bytes() == data == exported.read_bytes()


def test_mount_serve_shares_the_devices_both_ways(short_tmp: Path) -> None:
    image = short_tmp / "disk.img"
    image.write_bytes(bytes(16 * MiB))
    sock = short_tmp / "m.sock"
    with mounted(short_tmp / "mnt", [f"disk={image}"], ["--serve", str(sock)]) as m:
        uri = f"nbd+unix:///disk?socket={sock}"
        assert uri in m.output()
        nbdsh(uri, "h.pwrite(b'from nbd', 12345)")
        with open(m.path("disk"), "r+b") as f:
            f.seek(12345)
            assert f.read(8) == b"from nbd"
            f.seek(777)
            f.write(b"from fuse")
        assert nbdsh(uri, "print(h.pread(9, 777))").strip() == "bytearray(b'from fuse')"
        assert m.stop() == 0
    assert not sock.exists()
    assert image.read_bytes()[12345 : 12345 + 8] == b"from nbd"


def test_a_whole_filesystem_through_our_server_by_nbdfuse(short_tmp: Path) -> None:
    require_tool("nbdfuse", "libnbd-bin")
    with served(short_tmp, "-d", "disk=sparse(fs.img, size=256M)", "--socket", "s.sock"):
        mnt = short_tmp / "nbdmnt"
        mnt.mkdir()
        fuse = subprocess.Popen(
            ["nbdfuse", str(mnt), f"nbd+unix:///disk?socket={short_tmp}/s.sock"]
        )
        try:
            deadline = time.monotonic() + 30
            while not (mnt / "nbd").exists():
                assert fuse.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            with loop_device(mnt / "nbd") as dev:
                run("mkfs.ext4", "-q", "-F", dev)
                with fs_mounted(dev, short_tmp / "fs") as where:
                    payload = os.urandom(3 * MiB)
                    (where / "blob").write_bytes(payload)
                    (where / "dir").mkdir()
                    for i in range(50):
                        (where / "dir" / f"f{i}").write_text(str(i) * 100)
                    run("sync")
                with fs_mounted(dev, short_tmp / "fs") as where:
                    assert (where / "blob").read_bytes() == payload
                run("e2fsck", "-fn", dev)
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False, timeout=60)
            try:
                fuse.wait(30)
            except subprocess.TimeoutExpired:
                fuse.kill()
                fuse.wait()


def test_fio_verifies_at_depth_16_on_four_connections(short_tmp: Path) -> None:
    require_tool("fio", "fio")
    with served(short_tmp, "-d", "disk=mem(64M)", "--socket", "s.sock") as server:
        uri = f"nbd+unix:///disk?socket={short_tmp}/s.sock"
        out = subprocess.run(
            ["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
             "--bs=4k", "--iodepth=16", "--numjobs=4", "--size=16M", "--offset_increment=16M",
             "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
             "--group_reporting", "--output-format=json"],
            capture_output=True, text=True, timeout=240, cwd=short_tmp,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr
        report = json.loads(out.stdout[out.stdout.index("{") :])  # after "connected" lines
        assert out.stdout.count("connected to NBD server") == 4
        job = report["jobs"][0]
        assert job["error"] == 0 and job["write"]["io_bytes"] == 64 * MiB
        assert job["read"]["io_bytes"] == 64 * MiB  # every block read back and checked
        assert server.stop() == 0


def test_usage_errors_are_one_line(short_tmp: Path) -> None:
    out = blockfuse("serve", "-d", "disk=mem(1M)", cwd=short_tmp)
    assert out.returncode == 2 and "nothing to listen on" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    bad = blockfuse("serve", "-d", "disk=mem(1M)", "--listen", "nonsense", cwd=short_tmp)
    assert bad.returncode == 2 and "is not HOST:PORT" in bad.stderr
    with served(short_tmp, "-d", "disk=mem(1M)", "--socket", "busy.sock"):
        taken = blockfuse("serve", "-d", "disk=mem(1M)", "--socket", "busy.sock",
                          "--control", "other.ctl", cwd=short_tmp)  # fmt: skip
        assert taken.returncode == 1
        assert taken.stderr.strip() == (
            "blockfuse: busy.sock is in use by another server; stop it or choose another path"
        )
    (short_tmp / "stale.sock").touch()
    refused = blockfuse("serve", "-d", "disk=mem(1M)", "--socket", "stale.sock", cwd=short_tmp)
    assert refused.returncode == 1 and "exists and is not a socket" in refused.stderr
    assert READY  # the banner's last line is what `served` waits for


def test_status_json_has_the_same_facts_for_a_mount_and_a_server(short_tmp: Path) -> None:
    devices = ["mem=mem(4M)", "img=sparse(s.img, size=8M)"]
    args = [arg for d in devices for arg in ("-d", d)]
    with served(short_tmp, *args, "--socket", "x.sock", "--read-only") as server:
        from_server = status(short_tmp / "x.ctl")
        ro = subprocess.run(["nbdinfo", "--is", "read-only",
                             f"nbd+unix:///img?socket={short_tmp}/x.sock"], timeout=60)  # fmt: skip
        assert ro.returncode == 0
        assert server.stop() == 0
    with mounted(short_tmp / "mnt", devices, ["--read-only"], cwd=short_tmp) as m:
        from_mount = status(short_tmp / "mnt")
        assert m.stop() == 0
    assert (from_server["source"], from_mount["source"]) == ("server", "mount")
    by_name = sorted(from_server["devices"], key=lambda d: d["name"])  # type: ignore[arg-type, index]
    assert from_mount["devices"] == by_name
    assert by_name[0]["read_only"] is True and by_name[0]["allocated"] == 0  # type: ignore[index]
