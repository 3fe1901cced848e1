"""The status lines and the progress bar, without a mount."""

from __future__ import annotations

import io
import os

import trio

from blockfuse.cli.monitor import BAR_SECONDS, describe_copy, progress_bar, progress_line
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.mirror import open_mirror
from blockfuse.fuse.flatfile import FlatFile


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_describe_copy() -> None:
    values = {"state": "copying", "progress": "42", "copied": str(42 << 20)}
    values |= {"total": str(100 << 20), "rate": str(3 << 20), "eta": "75", "errors": "1"}
    assert describe_copy(values) == "copying 42% (42 MiB of 100 MiB) at 3 MiB/s, ETA 1:15, 1 error"
    values |= {"state": "failed: flushing the primary: EIO", "rate": "0", "errors": "17"}
    assert (
        describe_copy(values)
        == "failed at 42% (42 MiB of 100 MiB), 17 errors: flushing the primary: EIO"
    )


async def test_progress_bar_draws_on_a_terminal_only(autojump_clock: object) -> None:
    """On the autojump clock: the rate limit and the redraws take no real time."""
    size = 1 << 20
    primary = MemoryDevice(size)
    await primary.write(0, [os.urandom(size)])
    with trio.fail_after(10):
        async with open_mirror(primary, MemoryDevice(size), chunk=4096, rate=4 << 20) as m:
            files = [FlatFile("disk", m, kind="mirror", spec="mirror(...)")]
            assert progress_line(files).startswith("disk [")
            term, pipe = Terminal(), io.StringIO()
            async with progress_bar(files, term), progress_bar(files, pipe):
                await m.wait_synced()
                await trio.sleep(BAR_SECONDS + 0.1)  # one more redraw
    assert pipe.getvalue() == ""
    drawn = term.getvalue()
    assert drawn.startswith("\r") and drawn.endswith("\n")
    assert "[" + "#" * 30 + "] synced 100%" in drawn
