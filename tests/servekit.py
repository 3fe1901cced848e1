"""Our NBD server inside the test's own process, and clients for it.

    async with serving([mem_export()], short_tmp) as s:     # a Unix socket in short_tmp
        await run("nbdinfo", s.uri())                       # a real client, by its PID
        client = await s.client(nursery)                    # ours, over the socket

``run`` starts a tool with ``trio.run_process`` under a deadline, so it is killed (by
its PID) when the test ends or fails; ``nbdsh`` runs libnbd's shell with the system
Python it needs.  ``served`` runs ``blockfuse serve`` itself as a process (stopped by
its PID when the block ends), for the end-to-end tests.  ``Gate`` and ``Gauge`` are
pass-through devices that hold requests until a test lets them go, and count how many
are in a device at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from blockfuse.block import BlockDevice, Buffer
from blockfuse.devices.file import FileDevice, open_file
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.wrapper import PassThrough
from blockfuse.nbd.uri import parse_uri
from blockfuse.sectors import DeviceBytes
from blockfuse.serve.exports import Export
from blockfuse.serve.listen import Address, listen
from blockfuse.serve.runtime import Serving, running
from blockfuse.transport.client import NBDClient
from blockfuse.transport.connect import connect_nbd
from blockfuse.transport.connection import Limits
from blockfuse.transport.tlsserver import ServerTLS

from .conftest import require_tool
from .nbdpeers import _die_with_parent as die_with_parent

SIZE = 4 << 20
TOOL_TIMEOUT = 120
PACKAGES = {
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "nbdsh": "libnbd-bin",
    "nbdfuse": "libnbd-bin",
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "nbd-client": "nbd-client",
    "fio": "fio",
}


def export_of(device: BlockDevice, name: str = "disk", spec: str | None = None) -> Export:
    return Export(name, DeviceBytes(device), device.kind, spec or f"{device.kind} device")


def mem_export(name: str = "disk", size: int = SIZE) -> Export:
    return export_of(MemoryDevice(size), name, f"mem({size})")


@asynccontextmanager
async def file_device(
    image: Path, data: bytes = bytes(SIZE), *, read_only: bool = False
) -> AsyncIterator[FileDevice]:
    """A raw file device on ``image``, which holds ``data``, for the body of the block."""
    image.write_bytes(data)
    dev = open_file(str(image), read_only=read_only)
    try:
        yield dev
    finally:
        await dev.aclose()


@dataclass
class Served:
    serving: Serving
    address: Address

    def uri(self, export: str = "disk") -> str:
        return self.address.uri(export)

    async def client(self, nursery: trio.Nursery, export: str = "disk") -> NBDClient:
        with trio.fail_after(10):
            return await connect_nbd(nursery, parse_uri(self.uri(export)))


@asynccontextmanager
async def serving(
    exports: Sequence[Export],
    directory: Path,
    *,
    name: str = "nbd.sock",
    listing: bool = True,
    limits: Limits | None = None,
    grace: float = 5.0,
    tls: ServerTLS | None = None,
    tcp: bool = False,
) -> AsyncIterator[Served]:
    """Our server on ``exports`` at ``directory/name`` (``tcp``: 127.0.0.1, any free port)
    for the body of the block."""
    where = Address(host="127.0.0.1", port=0) if tcp else Address(path=str(directory / name))
    listening = await listen([where])
    address = listening.addresses[0]
    async with running(
        exports, listening, listing=listing, limits=limits, grace=grace, tls=tls
    ) as s:
        yield Served(s, address)


async def wait_until(condition: Callable[[], bool], limit: float = 10) -> None:
    """Poll ``condition`` (set by work in another task or process) for ``limit`` seconds."""
    with trio.fail_after(limit):
        while not condition():  # noqa: ASYNC110 - the state lives in the server and its peers
            await trio.sleep(0.01)


async def run(
    *argv: str, check: bool = True, limit: float = TOOL_TIMEOUT, system_python: bool = False
) -> subprocess.CompletedProcess[bytes]:
    """Run a tool to its end (killed after ``limit`` s); ``check``: it must exit 0."""
    require_tool(argv[0], PACKAGES.get(argv[0], argv[0]))
    env = dict(os.environ)
    if system_python:  # nbdsh runs `python3 -m nbd`: the system's, which has the binding
        env["PATH"] = "/usr/bin:" + env["PATH"]
    with trio.fail_after(limit):
        result = await trio.run_process(
            list(argv), capture_stdout=True, capture_stderr=True, check=False, env=env
        )
    if check:
        assert result.returncode == 0, (argv, result.stdout.decode(), result.stderr.decode())
    return result


async def nbdsh(uri: str, *script: str, check: bool = True) -> str:
    """Run libnbd's shell on ``uri`` with each ``-c`` script; its output."""
    argv = ["nbdsh", "-u", uri]
    for part in script:
        argv += ["-c", part]
    return (await run(*argv, check=check, system_python=True)).stdout.decode()


class Gate(PassThrough):
    """Reads (and writes) of the sectors in ``held`` wait for ``release``; ``entered``
    is set when one is waiting."""

    kind = "gate"

    def __init__(self, inner: BlockDevice, held: range, *, writes: bool = False) -> None:
        super().__init__(inner)
        self.held = held
        self.writes = writes
        self.release = trio.Event()
        self.entered = trio.Event()

    async def _maybe_wait(self, sector: int) -> None:
        if sector in self.held:
            self.entered.set()
            await self.release.wait()

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        await self._maybe_wait(sector)
        await self._inner.read(sector, buffers)

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        if self.writes:
            await self._maybe_wait(sector)
        await self._inner.write(sector, buffers)


class Gauge(PassThrough):
    """Every read (``writes``: every write instead) waits for ``release``; ``inside``
    counts those waiting, ``most`` the most there ever were at once."""

    kind = "gauge"

    def __init__(self, inner: BlockDevice, *, writes: bool = False) -> None:
        super().__init__(inner)
        self.inside = 0
        self.most = 0
        self.release = trio.Event()
        self._writes = writes

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        if not self._writes:
            await self._counted()
        await self._inner.read(sector, buffers)

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        if self._writes:
            await self._counted()
        await self._inner.write(sector, buffers)

    async def _counted(self) -> None:
        self.inside += 1
        self.most = max(self.most, self.inside)
        try:
            await self.release.wait()
        finally:
            self.inside -= 1


# --- `blockfuse serve` as a process ---------------------------------------------------------

READY = "Stop with Ctrl-C or SIGTERM"
"""The last line of the banner ``blockfuse serve`` prints once it listens."""


class ServeProcess:
    """A ``blockfuse serve`` process; ``stop`` ends it by its PID."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@contextmanager
def served(directory: Path, *args: str, ready: bool = True) -> Iterator[ServeProcess]:
    """``blockfuse serve ARGS`` running for the body of the block (cwd ``directory``)."""
    log = directory / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "blockfuse.cli", "serve", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=directory,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    p = ServeProcess(proc, log)
    try:
        deadline = time.monotonic() + 30
        while ready and READY not in p.output():
            assert proc.poll() is None, f"blockfuse serve exited:\n{p.output()}"
            assert time.monotonic() < deadline, f"blockfuse serve did not start:\n{p.output()}"
            time.sleep(0.02)
        yield p
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def blockfuse(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``blockfuse ARGS`` to its end (two minutes at most)."""
    return subprocess.run(
        [sys.executable, "-m", "blockfuse.cli", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd, check=False,
    )  # fmt: skip
