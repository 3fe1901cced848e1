"""Running blockfuse as a service, end to end: readiness to systemd, a mirror steered
without a remount behind nbdkit's rate filter, the log without a terminal, the status
of every mount and server on the host.  Every process is stopped by its PID."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Start, require_tool
from .mounting import attr, mounted, wait_attr
from .nbdpeers import Peer
from .servekit import blockfuse, served
from .timing import time_limit

limit = time_limit(150)
pytestmark = pytest.mark.e2e

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} blockfuse: ")
MiB = 1 << 20


@pytest.fixture
def notify_socket(
    short_tmp: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[str, socket.socket]]:
    """A Unix datagram socket standing for systemd's: (NOTIFY_SOCKET's value, socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "abstract":
        name = f"blockfuse-test-{os.getpid()}-{short_tmp.name}"
        sock.bind("\0" + name)
        value = "@" + name
    else:
        value = str(short_tmp / "notify.sock")
        sock.bind(value)
    sock.settimeout(30)
    with sock:
        yield value, sock


@pytest.mark.parametrize("notify_socket", ["path", "abstract"], indirect=True)
def test_a_mount_tells_systemd_it_is_ready_then_stopping(
    short_tmp: Path,
    notify_socket: tuple[str, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    value, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    config = short_tmp / "disk.toml"  # from a config file, as a unit would start it
    config.write_text('[mount]\ndevices = { disk = "mem(8M)", ram = "mem(1M)" }\n')
    with mounted(short_tmp / "mnt", extra=["--config", str(config)]) as m:
        ready = sock.recv(4096).decode()
        assert ready.splitlines() == ["READY=1", f"STATUS=serving 2 devices under {m.mountpoint}"]
        assert attr(m, "size") == str(8 * MiB)
        assert m.stop() == 0
    stopping = sock.recv(4096).decode()
    assert stopping.splitlines()[0] == "STOPPING=1"


def nbdkit_rate(start: Start, image: Path, trigger: Path, rate: str = "2M") -> Peer:
    """nbdkit serving ``image`` at ``rate`` bits per second, failing every read while
    ``trigger`` exists."""
    require_tool("nbdkit", "nbdkit")
    return start([
        "nbdkit", "-f", "-U", "{sock}", "--filter=error", "--filter=rate", "file", str(image),
        f"rate={rate}", "error-pread=EIO", "error-pread-rate=100%", f"error-pread-file={trigger}",
    ])  # fmt: skip


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return blockfuse(*args)


def test_retry_rate_and_cancel_a_mirror_behind_a_slow_nbdkit(short_tmp: Path, start: Start) -> None:
    require_tool("setfattr", "attr")
    primary, secondary, trigger = short_tmp / "p.img", short_tmp / "s.img", short_tmp / "fail"
    primary.write_bytes(os.urandom(3 * MiB))  # 2 Mbit/s: 12 s to copy it all
    uri = nbdkit_rate(start, primary, trigger).uri()
    spec = f"disk=mirror({uri}, sparse({secondary}), chunk=64K, state={short_tmp / 'map'})"
    with mounted(short_tmp / "mnt", [spec]) as m:
        disk = str(m.path("disk"))
        refused = cli("mirror", "retry", disk)
        assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1
        assert refused.stderr.startswith(
            f"blockfuse: cannot retry the copy of {disk}: the mirror is copying ("
        )
        assert refused.stderr.endswith("only a failed or cancelled copy can be retried\n")

        limited = cli("mirror", "rate", disk, "32K")  # the rate, at once
        assert limited.returncode == 0 and "copy rate limit 32 KiB/s" in limited.stderr
        assert attr(m, "rate_limit") == str(32 << 10)
        copied = int(attr(m, "copied"))
        wait_attr(m, "rate", lambda v: 0 < int(v) <= 48 << 10, timeout=20)
        subprocess.run(
            ["setfattr", "-n", "user.blockfuse.rate_limit", "-v", "none", disk], check=True
        )
        assert attr(m, "rate_limit") == ""

        cancelled = cli("mirror", "cancel", disk)  # the primary alone from now on
        assert cancelled.returncode == 0, cancelled.stderr
        assert "the primary serves alone" in cancelled.stderr
        assert attr(m, "state") == "cancelled"
        copied = int(attr(m, "copied"))
        with open(disk, "r+b") as f:
            f.write(b"written while cancelled")
            f.flush()
            os.fsync(f.fileno())
        assert not secondary.read_bytes().startswith(b"written while cancelled")
        assert int(attr(m, "copied")) <= copied  # nothing copied while cancelled

        trigger.touch()  # reads fail: the retried copy fails after its tries
        assert cli("mirror", "retry", disk).returncode == 0
        wait_attr(m, "state", lambda v: v == "failed", timeout=60)
        reason = attr(m, "last_error")
        assert reason.endswith("(gave up after 6 tries)") and "Input/output error" in reason
        status = cli("status", str(m.mountpoint)).stdout
        assert status.count(reason) == 1 and "failed at " in status
        bad = cli("mirror", "rate", disk, "0")
        assert bad.returncode == 2 and "more than 0" in bad.stderr

        trigger.unlink()  # the server recovers: retried by the attribute, as a user may
        subprocess.run(["setfattr", "-n", "user.blockfuse.retry", "-v", "1", disk], check=True)
        wait_attr(m, "state", lambda v: v == "synced", timeout=90)
        assert primary.read_bytes() == secondary.read_bytes()[: 3 * MiB]
        pivoted = cli("mirror", "pivot", disk)
        assert pivoted.returncode == 0 and attr(m, "state") == "pivoted"
        assert cli("mirror", "cancel", disk).returncode == 1  # the copy is over
        assert m.stop() == 0
    log = m.output()
    events = [
        "disk: copy rate limit 32 KiB/s", "disk: cancelled: at ", "disk: copying: retried",
        "disk: failed: copying sectors", "disk: synced: all", "disk: pivoted",
    ]  # fmt: skip
    for event in events:
        assert event in log, f"{event!r} not in:\n{log}"


def test_the_log_without_a_terminal_has_the_sync_and_the_reconnect(
    short_tmp: Path, start: Start
) -> None:
    image, secondary = short_tmp / "p.img", short_tmp / "s.img"
    image.write_bytes(os.urandom(2 * MiB))
    trigger = short_tmp / "never"
    peer = nbdkit_rate(start, image, trigger, rate="800M")
    spec = [f"disk=mirror({peer.uri()}, sparse({secondary}))", f"remote={peer.uri()}"]
    with mounted(short_tmp / "mnt", spec) as m:
        wait_attr(m, "state", lambda v: v == "synced", timeout=30)
        peer.stop()  # the server goes away (by its PID)...
        assert peer.path is not None
        os.unlink(peer.path)
        again = nbdkit_rate(start, image, trigger, rate="800M")  # ...and comes back
        assert again.uri() == peer.uri()
        with open(m.path("remote"), "rb") as f:  # the next read reconnects
            assert f.read(4096) == image.read_bytes()[:4096]
        wait_attr(m, "reconnects", lambda v: v == "1", name="remote", timeout=30)
        assert m.stop() == 0
    log = m.output()
    lines = [line for line in log.splitlines() if line.startswith("20")]
    assert lines and all(LOG_LINE.match(line) for line in lines), log
    assert "\r" not in log and "[###" not in log  # no bar without a terminal
    assert any("blockfuse: mounted: 2 devices under" in line for line in lines), log
    assert any("disk: synced: all 2 MiB copied" in line for line in lines), log
    server = f"unix:{peer.path}"
    assert any(f"warning: {server}: connection lost (" in line for line in lines), log
    assert any(f"{server}: reconnected after " in line for line in lines), log


def test_status_lists_every_mount_and_server(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = short_tmp / "run"
    monkeypatch.setenv("BLOCKFUSE_RUNTIME_DIR", str(runtime))
    with (
        mounted(short_tmp / "mnt", ["disk=mem(4M)"]) as m,
        served(short_tmp, "-d", "ram=mem(2M)", "--listen", "127.0.0.1:0") as server,
    ):
        control = str(runtime / f"serve-{server.proc.pid}.ctl")
        assert f"control: {control}" in server.output()
        listed = cli("status", "--json")
        assert listed.returncode == 0, listed.stderr
        reports = json.loads(listed.stdout)
        mine = [r for r in reports if r["path"] in (str(m.mountpoint), control)]
        assert [r["source"] for r in mine] == ["mount", "server"]
        mount, serve = mine
        assert mount["pid"] == m.proc.pid and mount["devices"][0]["name"] == "disk"
        assert serve["pid"] == server.proc.pid and serve["devices"][0]["size"] == 2 * MiB
        for target in (str(m.mountpoint), control):  # one asked by name: the same report
            one = json.loads(cli("status", "--json", target).stdout)
            assert one == next(r for r in reports if r["path"] == target), target
        text = cli("status").stdout
        assert f"{m.mountpoint} (mount, pid {m.proc.pid}):\n  disk: memory, 4 MiB" in text
        assert f"{control} (server, pid {server.proc.pid}):\n  ram: memory, 2 MiB" in text
        server.proc.kill()  # kill -9: its entry is stale, and dropped
        server.proc.wait()
        after = json.loads(cli("status", "--json").stdout)
        assert control not in [r["path"] for r in after]
        assert not list(runtime.glob("*.json"))
