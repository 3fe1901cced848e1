"""``--config FILE``: a TOML file and the same command line give the same parsed
command; what the file cannot say is a one-line usage error."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockfuse.cli import main, parse_args
from blockfuse.cli.config import ConfigError

MOUNT = """
log_level = "warning"

[mount]
mountpoint = "/srv/vm1"
read_only = true
allow-other = false
scratch_unit = "4M"
serve = [":10809", "/run/vm1.sock"]

[mount.devices]
disk = "mirror(nbd://10.0.0.5/vm1, sparse(/var/lib/vm1.img), state=/var/lib/vm1.map)"
ram = "mem(256M)"

[mount.scratch]
tmp = "mem(4G)"
"""
MOUNT_LINE = [
    "--log-level", "warning", "mount", "/srv/vm1", "--read-only", "--scratch-unit", "4M",
    "--serve", ":10809", "--serve", "/run/vm1.sock",
    "-d", "disk=mirror(nbd://10.0.0.5/vm1, sparse(/var/lib/vm1.img), state=/var/lib/vm1.map)",
    "-d", "ram=mem(256M)", "--scratch", "tmp=mem(4G)",
]  # fmt: skip
SERVE = """
[serve]
socket = ["./vm1.sock"]
listen = ["127.0.0.1:10809"]
control = "./vm1.ctl"
no_list = true
devices = { disk = "sparse(./vm1.img)", ram = "mem(8M)" }
"""
SERVE_LINE = [
    "serve", "--socket", "./vm1.sock", "--listen", "127.0.0.1:10809", "--control", "./vm1.ctl",
    "--no-list", "-d", "disk=sparse(./vm1.img)", "-d", "ram=mem(8M)",
]  # fmt: skip


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "blockfuse.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("text", "line"), [(MOUNT, MOUNT_LINE), (SERVE, SERVE_LINE)], ids=["mount", "serve"]
)
@pytest.mark.parametrize("where", ["before", "after", "alone"])
def test_a_config_file_is_the_same_command_line(
    tmp_path: Path, text: str, line: list[str], where: str
) -> None:
    config = write(tmp_path, text)
    command = "mount" if "[mount]" in text else "serve"
    argv = {
        "before": ["--config", config, command],
        "after": [command, f"--config={config}"],
        "alone": ["--config", config],
    }[where]
    assert vars(parse_args(argv)) == vars(parse_args(line))


def test_the_command_line_adds_to_the_file_and_overrides_it(tmp_path: Path) -> None:
    config = write(tmp_path, MOUNT)
    args = parse_args(["mount", "--config", config, "-d", "x=mem(1M)", "--log-level", "debug"])
    assert args.device[-1] == "x=mem(1M)" and len(args.device) == 3
    assert args.log_level == "debug"
    same = parse_args(["mount", "/srv/vm1", "--config", config])  # the same mountpoint: fine
    assert same.mountpoint == "/srv/vm1"


@pytest.mark.parametrize(
    ("text", "argv", "message"),
    [
        ("[mount]\nmountpont = 'x'\n", [], "[mount] mountpont: unknown key (known: allow_other,"),
        ("[mount]\nread_only = 'yes'\n", [], "[mount] read_only: must be true or false"),
        ("[mount\n", [], "is not valid TOML: "),
        ("[mount]\n[serve]\n", [], "has 2 command tables (mount, serve); name the command"),
        ("[mout]\n", [], "[mout] is not a command (mount, serve, umount, ls, status, pivot"),
        ("colour = 1\n[mount]\n", [], "unknown key 'colour'"),
        ("[mount]\nmountpoint = '/a'\n", ["mount", "/b"], "two mountpoints: /b on the command"),
        ("[mount]\ndevices = { disk = ['x'] }\n", [], "must be a string or a number"),
    ],
)
def test_what_a_file_cannot_say_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, argv: list[str], message: str
) -> None:
    config = write(tmp_path, text)
    with pytest.raises(ConfigError, match=None) as caught:
        parse_args(["--config", config, *argv])
    assert message in str(caught.value)
    assert main(["--config", config, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_missing_file_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--config", str(tmp_path / "none.toml"), "mount"]) == 2
    assert "cannot read the config file" in capsys.readouterr().err
