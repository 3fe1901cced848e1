"""Shared fixtures: scratch directories, and helpers that stop every process they start."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .nbdpeers import Peer

Start = Callable[..., Peer]
"""``start(argv, tcp=False) -> Peer``: see the ``start`` fixture."""

ENV = "BLOCKFUSE_RUNTIME_DIR"
"""Where servers register (``blockfuse/cli/registry.py``; not imported: it loads the CLI)."""

PACKAGES = {"nbdkit": "nbdkit", "qemu-nbd": "qemu-utils", "nbd-server": "nbd-server"}


@pytest.fixture(scope="session", autouse=True)
def private_runtime_dir() -> Iterator[Path]:
    """Servers and mounts the suite starts register here, not in the machine's
    ``/run/blockfuse`` (one killed by a test leaves its entry behind).  A test that
    looks at the registry sets a directory of its own on top."""
    path = Path(tempfile.mkdtemp(prefix="bf-run-"))
    before = os.environ.get(ENV)
    os.environ[ENV] = str(path)
    yield path
    if before is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = before
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short scratch directory under /tmp (Unix socket paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="bf-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def small_tmpfs_at(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``4M``) mounted on the new directory ``where`` for the body,
    unmounted at the end whatever happens: a filesystem a test can fill."""
    require_tool("mount", "util-linux")
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def require_tool(name: str, package: str) -> str:
    """The path of a tool the test needs, or a failure that says how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/setup (or apt-get install {package})")
    return path


@pytest.fixture
def start(short_tmp: Path) -> Iterator[Start]:
    """``start(argv, tcp=False)``: a real NBD server, ``{sock}`` in ``argv`` standing for its
    Unix socket (``tcp=True``: a 127.0.0.1 socket handed over by socket activation instead);
    every server started is stopped by PID when the test ends, also when it fails."""
    with contextlib.ExitStack() as stack:

        def run(argv: list[str], *, tcp: bool = False) -> Peer:
            require_tool(argv[0], PACKAGES.get(argv[0], argv[0]))
            if tcp:
                argv = [a for a in argv if a not in ("-U", "{sock}")]
            return stack.enter_context(Peer(argv, short_tmp, tcp=tcp))

        yield run
