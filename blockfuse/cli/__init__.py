"""The ``blockfuse`` command: one module per subcommand, each with its own parser.

``mount.py`` (mount), ``serve.py`` (serve: devices over NBD), ``umount.py`` (umount and
its wait), ``monitor.py`` (status, pivot and the mirror controls, of a mount or a
server; its reports are ``report.py``, the mounts and servers on the host
``registry.py``), ``progress.py`` (the progress bar), ``ls.py`` (an NBD server's
exports); ``devices.py`` opens the devices of mount and serve; ``common.py`` is what
they all share.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from .. import log as blockfuse_log
from ..spec import SpecError
from . import config, ls, monitor, mount, serve, umount
from .common import EXIT_USAGE, CommandError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "mount": mount.cmd_mount,
    "serve": serve.cmd_serve,
    "umount": umount.cmd_umount,
    "ls": ls.cmd_ls,
    "status": monitor.cmd_status,
    "pivot": monitor.cmd_pivot,
    "mirror": monitor.cmd_mirror,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with a ``--config FILE`` replaced by what it says
    (``config.py``); ``ConfigError`` if the file cannot be used."""
    parser, commands = build_parser()
    words = config.expand(sys.argv[1:] if argv is None else argv, commands)
    args = parser.parse_args(words)
    if args.command == "mount":
        config.settle_mountpoint(args)
        if args.mountpoint is None:
            commands["mount"].error("a MOUNTPOINT is needed (or mountpoint = ... in --config FILE)")
    return args


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``blockfuse`` parser, and each subcommand's."""
    parser = argparse.ArgumentParser(
        prog="blockfuse",
        description=(
            "Compose block devices and show each as a flat file in a FUSE mount, or "
            "export it over NBD."
        ),
    )
    parser.add_argument("--version", action="version", version=f"blockfuse {__version__}")
    add_config_option(parser)
    add_log_options(parser, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    mount.add_parser(sub)
    serve.add_parser(sub)
    umount.add_parser(sub)
    ls.add_parser(sub)
    monitor.add_parsers(sub)
    for name, command in sub.choices.items():  # accepted after the subcommand too
        for each in [command, *nested_commands(command)]:
            add_log_options(each, argparse.SUPPRESS)
        if name in ("mount", "serve"):
            add_config_option(command)
    return parser, dict(sub.choices)


def nested_commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The subcommands of a subcommand (``mirror retry``...)."""
    return [
        p
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for p in action.choices.values()
    ]


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """Shown in the help only: ``config.expand`` takes it out before parsing."""
    parser.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS,
        help="read the options of mount or serve from a TOML file (see the README); "
        "options given here too add to it or override it",
    )  # fmt: skip


def log_level_option(text: str) -> str:
    try:
        blockfuse_log.parse_level(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip().lower()


def add_log_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--log-level",
        type=log_level_option,
        default=default,
        metavar="LEVEL",
        help=f"show log lines at LEVEL or above: {', '.join(blockfuse_log.LEVELS)} "
        f"(default {blockfuse_log.DEFAULT_LEVEL})",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default,
        help="the same as --log-level debug",
    )  # fmt: skip


def log_level(args: argparse.Namespace) -> str:
    """``--log-level`` as given (before or after the subcommand; ``-v`` is ``debug``)."""
    if getattr(args, "verbose", False):
        return "debug"
    return str(getattr(args, "log_level", blockfuse_log.DEFAULT_LEVEL))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except config.ConfigError as exc:
        print(f"blockfuse: {exc}", file=sys.stderr)
        return EXIT_USAGE
    blockfuse_log.setup(log_level(args))
    try:
        return COMMANDS[args.command](args)
    except SpecError as exc:
        print(f"blockfuse: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(f"blockfuse: {exc}", file=sys.stderr)
        return exc.status
