"""The write lock on an image: a refusal names the process that holds it (issue 17)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from blockfuse.devices.file import open_file
from blockfuse.devices.images import lock_holder
from blockfuse.spec import Options, compile_spec

from .timing import time_limit

limit = time_limit(60)

HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[-1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@contextmanager
def held(path: Path, script: str = "holder.py", *args: str) -> Iterator[int]:
    """``path`` locked by another process, ``python SCRIPT ARGS... PATH``; its PID."""
    program = path.parent / script
    program.write_text(HOLD)
    proc = subprocess.Popen(
        [sys.executable, str(program), *args, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "x.img"
    path.write_bytes(bytes(1 << 20))
    return path


async def test_the_holder_is_found_in_proc_locks(image: Path) -> None:
    with held(image) as pid:
        fd = os.open(image, os.O_RDONLY)
        try:
            assert lock_holder(fd) == pid
        finally:
            os.close(fd)


async def test_a_lock_held_by_another_program_names_it(image: Path) -> None:
    with held(image) as pid, pytest.raises(ValueError) as info:
        open_file(str(image))
    assert f"{image} is locked (flock) by another program, pid {pid} (" in str(info.value)


async def test_a_blockfuse_still_closing_is_named_with_what_to_do(image: Path) -> None:
    """A blockfuse that holds the image and has no mount: unmounted, still closing."""
    with held(image, "blockfuse", "mount", "./mnt", "-d") as pid, pytest.raises(ValueError) as info:
        open_file(str(image))
    message = str(info.value)
    assert f"{image} is still open in blockfuse pid {pid}, which is unmounted" in message
    assert "wait for it to exit" in message and "blockfuse umount" in message


async def test_a_blockfuse_serve_is_named(image: Path) -> None:
    with held(image, "blockfuse", "-v", "serve", "-d") as pid, pytest.raises(ValueError) as info:
        open_file(str(image))
    assert f"{image} is in use by `blockfuse serve` (pid {pid}); stop it first" in str(info.value)


async def test_two_devices_of_one_process_get_the_old_message(image: Path) -> None:
    first = open_file(str(image))
    try:
        with pytest.raises(ValueError, match="by another blockfuse device"):
            open_file(str(image))
    finally:
        await first.aclose()


def lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


@pytest.mark.parametrize("spec", ["{}", "file({})", "sparse({})", "safe(sparse({}))"])
async def test_a_read_only_mount_opens_images_without_the_lock(image: Path, spec: str) -> None:
    """``--read-only`` (``Options(read_only=True)``) is ``file(PATH, ro=true)`` for every
    image: read-only, and no lock."""
    async with trio.open_nursery() as nursery:
        recipe = compile_spec(spec.format(image), Options(read_only=True))
        device = await recipe.open_alone(nursery)
        try:
            assert lock_is_free(image)
            assert not (await device.get_info()).read_write
        finally:
            await device.aclose()


async def test_a_read_only_mirror_locks_only_its_secondary(tmp_path: Path, image: Path) -> None:
    secondary = tmp_path / "s.img"
    spec = f"mirror({image}, sparse({secondary}))"
    async with trio.open_nursery() as nursery:
        device = await compile_spec(spec, Options(read_only=True)).open_alone(nursery)
        try:
            assert lock_is_free(image) and not lock_is_free(secondary)
        finally:
            await device.aclose()
