"""NBD remotes through a real mount: cmp against the server's backing file, writes land."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import require_tool
from .hostile_nbd import HostileProcess
from .mounting import blockfuse_command, is_mounted, mounted
from .nbdpeers import DaemonPeer, Peer
from .timing import time_limit

pytestmark = pytest.mark.e2e

SIZE = 8 << 20
limit = time_limit(90)


@pytest.fixture
def image(short_tmp: Path) -> Path:
    path = short_tmp / "backing.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.seek(1 << 20)
        f.write(os.urandom(256 << 10))
    return path


def start_server(kind: str, short_tmp: Path, image: Path) -> Peer:
    if kind == "nbd-server":
        require_tool("nbd-server", "nbd-server")
        conf = f"[generic]\n    unixsock = {{sock}}\n[disk]\n    exportname = {image}\n"
        conf += "    flush = true\n    fua = true\n    trim = true\n"
        return DaemonPeer(conf, short_tmp)
    if kind == "qemu-nbd":
        require_tool("qemu-nbd", "qemu-utils")
        return Peer(
            ["qemu-nbd", "-t", "-e", "0", "-k", "{sock}", "-x", "disk", "-f", "raw", str(image)],
            short_tmp,
        )
    require_tool("nbdkit", "nbdkit")
    return Peer(["nbdkit", "-f", "-U", "{sock}", "file", str(image)], short_tmp)


@pytest.fixture(params=["nbdkit", "qemu-nbd", "nbd-server"])
def server(request: pytest.FixtureRequest, short_tmp: Path, image: Path) -> Iterator[Peer]:
    with start_server(request.param, short_tmp, image) as peer:
        yield peer


def cmp(a: Path, b: Path) -> None:
    subprocess.run(["cmp", str(a), str(b)], check=True, timeout=60)


def test_mounted_remote_matches_and_takes_writes(
    short_tmp: Path, image: Path, server: Peer
) -> None:
    data = short_tmp / "data"
    data.write_bytes(os.urandom(3 << 20))
    with mounted(short_tmp / "mnt", [f"r={server.uri('disk')}"]) as m:
        flat = m.path("r")
        assert flat.stat().st_size == SIZE and flat.stat().st_mode & 0o777 == 0o644
        cmp(flat, image)
        subprocess.run(
            [
                "dd",
                f"if={data}",
                f"of={flat}",
                "bs=1M",
                "seek=4",
                "conv=notrunc,fsync",
                "status=none",
            ],
            check=True,
            timeout=60,
        )
        with open(flat, "r+b") as f:
            f.seek(100)
            f.write(b"unaligned bytes")
            f.flush()
            os.fsync(f.fileno())
        expected = bytearray(image.read_bytes())
        assert expected[4 << 20 : 7 << 20] == data.read_bytes()
        assert expected[100:115] == b"unaligned bytes"
        cmp(flat, image)
        kind = os.getxattr(flat, "user.blockfuse.kind")
        assert kind == b"nbd" and os.getxattr(flat, "user.blockfuse.connection") == b"connected"


def test_read_only_remote_is_0444(short_tmp: Path, image: Path) -> None:
    require_tool("qemu-nbd", "qemu-utils")
    argv = ["qemu-nbd", "-t", "-e", "0", "-r", "-k", "{sock}", "-x", "ro", "-f", "raw", str(image)]
    with (
        Peer(argv, short_tmp) as peer,
        mounted(short_tmp / "mnt", [f"ro=safe({peer.uri('ro')})"]) as m,
    ):
        assert m.path("ro").stat().st_mode & 0o777 == 0o444
        with pytest.raises(OSError) as info:
            os.open(m.path("ro"), os.O_RDWR)
        assert info.value.errno == errno.EROFS
        cmp(m.path("ro"), image)


def test_server_errors_leave_the_mount_up(short_tmp: Path) -> None:
    require_tool("nbdkit", "nbdkit")
    inject = short_tmp / "inject"
    argv = ["nbdkit", "-f", "-U", "{sock}", "--filter=error", "memory", "4M",
            "error-pread=EIO", "error-pread-rate=100%", f"error-pread-file={inject}"]  # fmt: skip
    with Peer(argv, short_tmp) as peer, mounted(short_tmp / "mnt", [f"r={peer.uri()}"]) as m:
        fd = os.open(m.path("r"), os.O_RDONLY)
        try:
            inject.touch()
            with pytest.raises(OSError) as info:
                os.pread(fd, 4096, 0)
            assert info.value.errno == errno.EIO
            inject.unlink()
            assert os.pread(fd, 4096, 0) == bytes(4096)
        finally:
            os.close(fd)


def test_unknown_export_fails_the_mount_clearly(short_tmp: Path, image: Path) -> None:
    with start_server("qemu-nbd", short_tmp, image) as peer:
        out = subprocess.run(
            blockfuse_command("mount", str(short_tmp / "mnt"), "-d", f"r={peer.uri('nope')}"),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert out.returncode == 1
    assert "has no export named 'nope'" in out.stderr


def test_concurrent_unaligned_aio_writes_keep_every_byte(short_tmp: Path) -> None:
    """fio writes 1000-byte blocks at depth 16 (libaio, O_DIRECT), then checks each one.

    Asynchronous direct writes reach the mount concurrently (the kernel drops the inode
    lock once a request is queued; 13 in flight measured at depth 16).  Neighbouring
    blocks share sectors, and the server delays every request by 2 ms, so the flat
    file's read-modify-writes of one sector would overlap unless its range lock keeps
    them apart (without it, this loses bytes).
    """
    require_tool("fio", "fio")
    require_tool("nbdkit", "nbdkit")
    argv = ["nbdkit", "-f", "-U", "{sock}", "--filter=delay", "memory", "1M",
            "rdelay=2ms", "wdelay=2ms"]  # fmt: skip
    with Peer(argv, short_tmp) as peer, mounted(short_tmp / "mnt", [f"r={peer.uri()}"]) as m:
        cmd = [
            "fio", "--name=overlap", f"--filename={m.path('r')}", "--ioengine=libaio",
            "--direct=1", "--iodepth=16", "--rw=randwrite", "--bs=1000",
            "--size=200000", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
            "--verify_state_save=0", "--randseed=5",
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify" not in result.stderr, result.stderr


# --- a server that stalls, behind a real mount --------------------------------------------

REQUEST_TIMEOUT = 2
STALLS = {
    "stalls-mid-reply": {"stall": "during"},
    "never-greets-a-reconnect": {"greet_connections": 1, "close_every": 1},
}


def peak_memory(pid: int) -> int:
    """The peak resident set (VmHWM) of ``pid``, in bytes, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) << 10
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def direct_read(path: Path) -> subprocess.Popen[str]:
    """dd reading 4 KiB with O_DIRECT, so the errno comes back as the device gave it."""
    argv = ["dd", f"if={path}", "of=/dev/null", "bs=4096", "count=1", "iflag=direct"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def readers() -> Iterator[list[subprocess.Popen[str]]]:
    """Reader processes a test starts; any still running at the end are killed by PID."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for reader in started:
        if reader.poll() is None:
            reader.kill()
            reader.wait(timeout=30)


@pytest.mark.parametrize("script", STALLS.values(), ids=STALLS.keys())
def test_a_stalled_server_cannot_hang_readers_or_the_mount(
    short_tmp: Path, script: dict[str, object], readers: list[subprocess.Popen[str]]
) -> None:
    """Readers of a stalled server once hung for good (unkillable, the mount unstoppable):
    with timeout=2 a reader gets ETIMEDOUT in about 2 s and the status stops saying
    'connected', two readers at once get theirs as soon, and SIGTERM with a reader stalled
    ends the mount within 2 * timeout + 5 s (the reader's deadline, then the flush's, then
    a bounded close)."""
    with HostileProcess(short_tmp, script) as server:
        spec = f"r=nbd({server.uri()}, timeout={REQUEST_TIMEOUT})"
        with mounted(short_tmp / "mnt", [spec]) as m:
            flat = m.path("r")

            def state() -> str:
                return os.getxattr(flat, "user.blockfuse.connection").decode()

            for count in (1, 2):
                started = time.monotonic()
                batch = [direct_read(flat) for _ in range(count)]
                readers.extend(batch)
                errors = [r.communicate(timeout=60)[1] for r in batch]
                elapsed = time.monotonic() - started
                assert [r.returncode for r in batch] == [1] * count
                assert all("Connection timed out" in e for e in errors), errors
                assert elapsed < REQUEST_TIMEOUT + 4, elapsed
                if count == 1:  # its request's own deadline passes a moment after the read's
                    wait_until(lambda: not state().startswith("connected"), 5, "the drop")
                    assert re.match(STALLED_STATE, state()), state()

            stalls = server.stalls()
            last = direct_read(flat)
            readers.append(last)
            wait_until(lambda: server.stalls() > stalls, 30, "the third read to stall")
            assert peak_memory(m.proc.pid) < 200 << 20
            started = time.monotonic()
            m.stop(signal.SIGTERM, timeout=60)
            assert time.monotonic() - started < 2 * REQUEST_TIMEOUT + 5 + 3
            assert not is_mounted(m.mountpoint)
            last.communicate(timeout=60)
            assert last.returncode == 1


STALLED_STATE = r"(disconnected|reconnecting); last: read of 4096 bytes at 0: no answer from "
