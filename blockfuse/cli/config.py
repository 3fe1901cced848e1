"""``--config FILE``: a TOML file holding what a command line would say.

::

    log_level = "info"                      # --log-level

    [mount]                                 # blockfuse mount ...
    mountpoint = "/srv/vm1"                 # MOUNTPOINT
    read_only = false                       # --read-only
    serve = ["/run/vm1.sock"]               # --serve ADDR, repeated
    [mount.devices]                         # --device NAME=SPEC, in this order
    disk = "mirror(nbd://10.0.0.5/vm1, sparse(/var/lib/vm1.img), state=/var/lib/vm1.map)"
    [mount.scratch]                         # --scratch NAME=SPEC
    tmp = "mem(4G)"

    [serve]                                 # blockfuse serve ...
    socket = ["/run/vm1.sock"]
    [serve.devices]
    disk = "sparse(/var/lib/vm1.img)"

The file is turned into the very command-line words it stands for, which the command's
own parser then reads after them (``expand``): so a file and the same command line
give the same mount, checked the same way, and options given on the command line too
add to the file's (``--device``) or override them (``--log-level``).  A table is a
subcommand; its keys are that subcommand's option names (``read_only`` or
``read-only``; ``devices``/``device`` and ``scratch`` are tables of NAME = SPEC), so
a new option is a new key without a change here.  A file with one table needs no
subcommand on the command line: ``blockfuse --config /etc/blockfuse/vm1.toml``.
Relative paths are relative to the working directory, as on the command line.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Sequence
from typing import Any

from ..spec import SpecError

OPTION = "--config"
HIDDEN_MOUNTPOINT = "--config-mountpoint"
"""The file's ``mountpoint``: given to ``mount`` as this hidden option, so that a
MOUNTPOINT on the command line too can be told apart (and refused if it differs)."""
GLOBAL_KEYS = {"log_level": "--log-level", "log-level": "--log-level"}
NOT_KEYS = ("help", "config", "config_mountpoint")
"""Options of a command that a file's table cannot hold."""


class ConfigError(SpecError):
    """A config file that cannot be used: exit status 2, nothing done."""


def take_config(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``--config FILE`` (or ``--config=FILE``) out of ``argv``: the file, and the rest."""
    out: list[str] = []
    path = None
    words = iter(argv)
    for word in words:
        if word == "--":
            out += [word, *words]
            break
        if word == OPTION:
            path = next(words, None)
            if path is None:
                raise ConfigError(f"{OPTION} needs a FILE")
        elif word.startswith(OPTION + "="):
            path = word.split("=", 1)[1]
        else:
            out.append(word)
    return path, out


def load(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def expand(argv: Sequence[str], commands: dict[str, argparse.ArgumentParser]) -> list[str]:
    """``argv`` with its ``--config FILE`` replaced by the words the file stands for."""
    path, argv = take_config(argv)
    if path is None:
        return list(argv)
    config = load(path)
    tables = [key for key, value in config.items() if isinstance(value, dict)]
    for key in tables:
        if key not in commands:
            raise ConfigError(f"{path}: [{key}] is not a command ({', '.join(commands)})")
    for key in config:
        if key not in tables and key not in GLOBAL_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} (known: log_level, and tables)")
    head, command, tail = split_command(argv, commands)
    if command is None:
        if len(tables) != 1:
            raise ConfigError(
                f"{path} has {len(tables)} command tables ({', '.join(tables) or 'none'}); "
                "name the command: blockfuse --config FILE COMMAND"
            )
        command = tables[0]
    words = [w for key, opt in GLOBAL_KEYS.items() if key in config for w in (opt, config[key])]
    table = config.get(command, {})
    return [*words, *head, command, *table_words(path, command, table, commands[command]), *tail]


def split_command(
    argv: Sequence[str], commands: dict[str, argparse.ArgumentParser]
) -> tuple[list[str], str | None, list[str]]:
    """``argv`` as (the words before the subcommand, the subcommand, the words after)."""
    takes_value = {"--log-level"}
    skip = False
    for index, word in enumerate(argv):
        if skip:
            skip = False
        elif word in takes_value:
            skip = True
        elif not word.startswith("-"):
            if word in commands:
                return list(argv[:index]), word, list(argv[index + 1 :])
            break
    return list(argv), None, []


def table_words(
    path: str, command: str, table: dict[str, Any], parser: argparse.ArgumentParser
) -> list[str]:
    """The command-line words of one command's table (see the module text)."""
    actions = {a.dest: a for a in parser._actions}
    words: list[str] = []
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest not in actions and dest.endswith("s") and dest[:-1] in actions:
            dest = dest[:-1]  # devices = {...} for --device
        action = actions.get(dest)
        where = f"{path}: [{command}] {key}"
        if action is None or dest in NOT_KEYS:
            known = sorted(k for k in actions if k not in NOT_KEYS)
            raise ConfigError(f"{where}: unknown key (known: {', '.join(known)})")
        words += action_words(where, action, value)
    return words


def action_words(where: str, action: argparse.Action, value: Any) -> list[str]:
    if not action.option_strings:  # the positional MOUNTPOINT
        return [HIDDEN_MOUNTPOINT, scalar(where, value)]
    option = max(action.option_strings, key=len)
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, not {value!r}")
        return [option] if value else []
    if isinstance(action, argparse._AppendAction):
        if isinstance(value, dict):  # NAME = SPEC
            return [
                w for name, spec in value.items() for w in (option, f"{name}={scalar(where, spec)}")
            ]
        items = value if isinstance(value, list) else [value]
        return [w for item in items for w in (option, scalar(where, item))]
    return [option, scalar(where, value)]


def scalar(where: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{where}: must be a string or a number, not {value!r}")
    return str(value)


def settle_mountpoint(args: argparse.Namespace) -> None:
    """The mountpoint from the command line or the file (not two different ones)."""
    from_file = getattr(args, "config_mountpoint", None)
    if hasattr(args, "config_mountpoint"):
        del args.config_mountpoint
    if from_file is None:
        return
    if args.mountpoint is not None and args.mountpoint != from_file:
        raise ConfigError(
            f"two mountpoints: {args.mountpoint} on the command line and {from_file} in the "
            "config file; give one"
        )
    args.mountpoint = from_file
