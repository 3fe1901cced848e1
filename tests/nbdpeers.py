"""Real NBD servers for interop tests: started in the foreground, stopped by PID.

Every server listens on a Unix socket in a short private directory, or on a 127.0.0.1
socket that the test binds itself and hands over by socket activation (no port races).
``stop`` sends SIGTERM, waits, then SIGKILLs, always by PID; servers also get
``PR_SET_PDEATHSIG`` so a crashed test run cannot leave them behind.  A peer is a
context manager, ``with Peer(argv, tmp) as p:``, that stops it when the block ends
(also when a check fails).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def wait_connectable(path: str | None, port: int | None, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        s = socket.socket(socket.AF_UNIX if path else socket.AF_INET)
        try:
            s.connect(path if path else ("127.0.0.1", port))
            return
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    raise AssertionError("server did not start listening")


class Peer:
    """One server process; ``uri(export)`` is how to reach it.  ``with Peer(...) as p:``
    stops it (``stop``) when the block ends."""

    def __init__(self, argv: list[str], directory: Path, *, tcp: bool = False) -> None:
        self.dir = directory
        self.log_path = directory / f"{Path(argv[0]).name}.log"
        self.path: str | None = None
        self.port: int | None = None
        log = open(self.log_path, "wb")  # noqa: SIM115
        if tcp:
            self.proc = self._activated(argv, log)
        else:
            self.path = str(directory / "nbd.sock")
            argv = [a.replace("{sock}", self.path) for a in argv]
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=log, start_new_session=True, preexec_fn=_die_with_parent
            )
            wait_connectable(self.path, None, self.proc)
        log.close()

    def _activated(self, argv: list[str], log: object) -> subprocess.Popen[bytes]:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        fd = listener.fileno()
        move = "" if fd == 3 else f"exec 3<&{fd} {fd}<&-; "
        script = move + "LISTEN_PID=$$ LISTEN_FDS=1 exec " + shlex.join(argv)
        try:
            return subprocess.Popen(
                ["bash", "-c", script],
                pass_fds=[fd],
                stdout=log,  # type: ignore[arg-type]
                stderr=log,  # type: ignore[arg-type]
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            listener.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def uri(self, export: str = "") -> str:
        if self.path:
            return f"nbd+unix:///{export}?socket={self.path}"
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class DaemonPeer(Peer):
    """nbd-server: it daemonises, so it is stopped by the PID in its pid file (and its
    per-connection children by theirs)."""

    def __init__(self, config: str, directory: Path) -> None:
        self.dir = directory
        self.log_path = directory / "nbd-server.log"
        self.path = str(directory / "nbd.sock")
        self.port = None
        conf = directory / "nbd-server.conf"
        conf.write_text(config.replace("{sock}", self.path))
        self.pidfile = directory / "nbd-server.pid"
        with open(self.log_path, "wb") as log:
            subprocess.run(
                ["nbd-server", "-C", str(conf), "-p", str(self.pidfile)],
                stdout=log,
                stderr=log,
                check=True,
                timeout=15,
            )
        deadline = time.monotonic() + 15
        while not self.pidfile.exists() or not os.path.exists(self.path):
            assert time.monotonic() < deadline, "nbd-server did not start"
            time.sleep(0.02)
        self.pid = int(self.pidfile.read_text().split()[0])

    def stop(self) -> None:
        for pid in [*children(self.pid), self.pid]:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{self.pid}") and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in [*children(self.pid), self.pid]:
            _kill(pid, signal.SIGKILL)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out
