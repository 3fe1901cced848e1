"""``scripts/blockfuse`` (through ``scripts/setup``) run by a user who cannot write the
checkout: it says what is wrong and what to do, instead of a bare "Permission denied"
(issue 17).  The checkout here is a root-owned copy of the scripts and pyproject.toml,
run as ``nobody``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .timing import time_limit

limit = time_limit(60)
REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")


@pytest.fixture
def checkout(short_tmp: Path) -> Path:
    """A root-owned checkout others may read (mode 0755) but not write."""
    short_tmp.chmod(0o755)
    root = short_tmp / "blockfuse"
    root.mkdir(mode=0o755)
    shutil.copytree(REPO / "scripts", root / "scripts")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def as_nobody(checkout: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         str(checkout / "scripts" / "blockfuse"), *args],
        capture_output=True, text=True, timeout=30, cwd="/",
        env={"PATH": os.environ["PATH"], "HOME": "/nonexistent"},
    )  # fmt: skip


def venv_of(checkout: Path, python: str) -> None:
    """A .venv as root's setup leaves it: its python a link to ``python``, set up."""
    bin_dir = checkout / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(python)
    (checkout / ".venv" / "pyvenv.cfg").write_text(f"executable = {python}\n")
    (checkout / ".venv" / ".setup-stamp").touch()


def assert_told(out: subprocess.CompletedProcess[str], checkout: Path, why: str) -> None:
    assert out.returncode == 1, out
    assert "Errno 13" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert (
        f"blockfuse setup: {checkout}/.venv needs setting up ({why}), but nobody cannot "
        f"write to {checkout} (it belongs to root)" in out.stderr
    ), out.stderr
    assert "ask root to set it up with a Python every user can run:" in out.stderr
    assert f"rm -rf {checkout}/.venv && PYTHON=/usr/bin/python3 {checkout}/scripts/setup" in (
        out.stderr
    )
    assert f"cp -r {checkout} ~/blockfuse && rm -rf ~/blockfuse/.venv" in out.stderr
    assert not (checkout / ".venv" / "setup.log").exists()


def test_a_checkout_never_set_up(checkout: Path) -> None:
    assert_told(as_nobody(checkout, "--version"), checkout, "there is no .venv yet")


def test_a_venv_whose_python_the_user_cannot_run(checkout: Path, short_tmp: Path) -> None:
    private = short_tmp / "private"
    private.mkdir(mode=0o700)
    os.symlink(sys.executable, private / "python3")
    venv_of(checkout, str(private / "python3"))
    why = f".venv/bin/python, {private}/python3, does not run for nobody"
    assert_told(as_nobody(checkout, "--version"), checkout, why)


def test_a_venv_older_than_pyproject(checkout: Path) -> None:
    python = shutil.which("python3", path="/usr/bin")
    assert python is not None
    venv_of(checkout, python)  # one every user can run
    stamp = checkout / ".venv" / ".setup-stamp"
    os.utime(stamp, (1, 1))
    why = "pyproject.toml changed since .venv was set up"
    assert_told(as_nobody(checkout, "--version"), checkout, why)
