"""The status lines, the progress bar and the JSON report, without a mount."""

from __future__ import annotations

import io
import os

import pytest
import trio

from blockfuse.cli.progress import BAR_SECONDS, bar_line, mirror_lines, progress_bar
from blockfuse.cli.report import describe_copy, device_lines
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.mirror import open_mirror
from blockfuse.fuse.flatfile import FlatFile
from blockfuse.log import Console


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


COPYING = {
    "state": "copying", "progress": "42", "copied": str(451411968), "total": str(1 << 30),
    "rate": str(16 << 20), "eta": "37", "errors": "0", "rate_limit": "",
}  # fmt: skip
REASON = (
    "copying sectors 1564672-1572864: unix:/run/blockfuse/nbd.sock: still unreachable after "
    "5 retries: cannot connect to unix:/run/blockfuse/nbd.sock: [Errno 111] Connection "
    "refused (gave up after 6 tries)"
)
FAILED = COPYING | {"state": "failed", "progress": "8", "rate": "0", "eta": "", "errors": "28"}
FAILED |= {"last_error": REASON}


def test_describe_copy() -> None:
    values = {"state": "copying", "progress": "42", "copied": str(42 << 20)}
    values |= {"total": str(100 << 20), "rate": str(3 << 20), "eta": "75", "errors": "1"}
    assert describe_copy(values) == "copying 42% (42 MiB of 100 MiB) at 3 MiB/s, ETA 1:15, 1 error"
    values |= {"rate_limit": str(4 << 20)}
    assert "at 3 MiB/s, limit 4 MiB/s, ETA" in describe_copy(values)


def test_a_failed_copy_says_its_reason_once_and_counts_its_errors() -> None:
    assert describe_copy(FAILED) == "failed at 8% (430.5 MiB of 1 GiB), 28 errors"
    lines = device_lines({"name": "disk", "kind": "mirror", "size": str(1 << 30), **FAILED})
    assert sum(REASON in line for line in lines) == 1
    assert lines[-1] == f"  last error: {REASON}"


@pytest.mark.parametrize("columns", [40, 80, 160])
@pytest.mark.parametrize("values", [COPYING, FAILED], ids=["copying", "failed"])
def test_a_bar_line_never_reaches_the_last_column(columns: int, values: dict[str, str]) -> None:
    line = bar_line("disk", values, columns)
    assert len(line) <= columns - 1
    assert line.startswith("disk ") and "\n" not in line
    assert f"{values['state']}" in line and f"{values['progress']}%" in line


def test_what_a_narrow_terminal_leaves_out() -> None:
    assert bar_line("disk", COPYING, 160) == (
        "disk [############------------------] copying 42%, 430.5 MiB of 1 GiB, 16 MiB/s, ETA 0:37"
    )
    assert bar_line("disk", COPYING, 80) == (
        "disk [########------------] copying 42%, 430.5 MiB of 1 GiB, 16 MiB/s, ETA 0:37"
    )
    assert bar_line("disk", COPYING, 40) == "disk [####------] copying 42%, ETA 0:37"
    assert bar_line("disk", COPYING, 20) == "disk copying 42%"
    assert bar_line("a-very-long-device-name", COPYING, 40).startswith("a-very-long-d... [")
    failed = bar_line("disk", FAILED, 80)
    assert failed.startswith("disk [--------] failed at 8%, 430.5 MiB of 1 GiB, 28 errors: copying")
    assert failed.endswith("...") and len(failed) == 79


def test_one_line_per_mirror_and_none_for_other_devices() -> None:
    class Fake(FlatFile):
        def __init__(self, name: str, values: dict[str, str]) -> None:
            super().__init__(name, MemoryDevice(512), kind="mirror", spec="")
            self.values = values

        def status(self) -> dict[str, str]:
            return self.values

    files = [Fake("disk", COPYING), Fake("ram", {}), Fake("vm2", FAILED)]
    lines = mirror_lines(files, 80)
    assert len(lines) == 2 and lines[0].startswith("disk [") and lines[1].startswith("vm2  [")


def test_the_console_writes_log_lines_above_the_live_area() -> None:
    term = Terminal()
    console = Console(term)
    console.show(["disk [#---] copying 1%", "vm2 [----] copying 0%"])
    console.write_line("a log line")
    console.show(["disk [##--] copying 50%", "vm2 [#---] copying 10%"])
    console.keep()
    out = term.getvalue()
    up = "\x1b[1A"
    assert out == (
        "disk [#---] copying 1%\nvm2 [----] copying 0%"
        f"\r\x1b[K{up}\r\x1b[Ka log line\n"
        "disk [#---] copying 1%\nvm2 [----] copying 0%"
        f"\r\x1b[K{up}\r\x1b[Kdisk [##--] copying 50%\nvm2 [#---] copying 10%\n"
    )


async def test_progress_bar_draws_on_a_terminal_only(autojump_clock: object) -> None:
    """On the autojump clock: the rate limit and the redraws take no real time."""
    size = 1 << 20
    primary = MemoryDevice(size)
    await primary.write(0, [os.urandom(size)])
    with trio.fail_after(10):
        async with open_mirror(primary, MemoryDevice(size), chunk=4096, rate=4 << 20) as m:
            files = [FlatFile("disk", m, kind="mirror", spec="mirror(...)")]
            assert mirror_lines(files, 80)[0].startswith("disk [")
            term, pipe = Terminal(), io.StringIO()
            async with progress_bar(files, Console(term)), progress_bar(files, Console(pipe)):
                await m.wait_synced()
                await trio.sleep(BAR_SECONDS + 0.1)  # one more redraw
    assert pipe.getvalue() == ""
    drawn = term.getvalue()
    assert drawn.endswith("\n") and "\n" not in drawn[:-1]  # one line, redrawn in place
    assert "[" + "#" * 30 + "] synced 100%, 1 MiB of 1 MiB" in drawn
