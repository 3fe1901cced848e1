"""The man page and the bash completion are made from the parser: every command and
every option ``--help`` shows is in them, groff reads the page without a warning, and
bash completes the commands, a mirror's actions and the log levels."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from blockfuse.cli import build_parser
from blockfuse.cli.manpage import bash_completion, man_page, subcommands, visible

PARSER, COMMANDS = build_parser()


def every_parser() -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for name, sub in COMMANDS.items():
        actions = subcommands(sub)
        out += [(f"{name} {inner}", p) for inner, p in actions.items()] or [(name, sub)]
    return out


def test_the_man_page_has_every_command_and_option() -> None:
    page = man_page(PARSER)
    for name, parser in every_parser():
        assert f"\\fBblockfuse {name}\\fR".replace("-", "\\-") in page, name
        for action in visible(parser):  # type: ignore[arg-type]
            for option in action.option_strings:
                assert f"\\fB{option.replace('-', chr(92) + '-')}\\fR" in page, (name, option)


def test_groff_reads_the_man_page_without_a_warning(tmp_path: Path) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    page = tmp_path / "blockfuse.1"
    page.write_text(man_page(PARSER))
    out = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and out.stderr == ""


def complete(script: Path, line: str) -> list[str]:
    probe = f"""
source {script}
COMP_WORDS=({line}); [[ "{line}" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))
_blockfuse
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_bash_completes_commands_actions_options_and_levels(tmp_path: Path) -> None:
    script = tmp_path / "blockfuse.bash"
    script.write_text(bash_completion(PARSER))
    assert set(COMMANDS) <= set(complete(script, "blockfuse "))
    assert complete(script, "blockfuse mirror ") == ["retry", "cancel", "pivot", "rate"]
    assert "--device" in complete(script, "blockfuse mount --")
    assert "--json" in complete(script, "blockfuse --log-level debug status --")
    assert complete(script, "blockfuse --log-level ") == ["error", "warning", "info", "debug"]
