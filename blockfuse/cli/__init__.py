"""The ``blockfuse`` command: one module per subcommand, each with its own parser.

``mount.py`` (mount), ``serve.py`` (serve: devices over NBD), ``umount.py`` (umount and
its wait), ``monitor.py`` (status, pivot, the progress bar, of a mount or a server),
``ls.py`` (an NBD server's exports); ``devices.py`` opens the devices of mount and serve;
``common.py`` is what they all share.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from ..spec import SpecError
from . import ls, monitor, mount, serve, umount
from .common import EXIT_USAGE, CommandError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "mount": mount.cmd_mount,
    "serve": serve.cmd_serve,
    "umount": umount.cmd_umount,
    "ls": ls.cmd_ls,
    "status": monitor.cmd_status,
    "pivot": monitor.cmd_pivot,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="blockfuse",
        description=(
            "Compose block devices and show each as a flat file in a FUSE mount, or "
            "export it over NBD."
        ),
    )
    add_global_options(parser, default=False)
    parser.add_argument("--version", action="version", version=f"blockfuse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    mount.add_parser(sub)
    serve.add_parser(sub)
    umount.add_parser(sub)
    ls.add_parser(sub)
    monitor.add_parsers(sub)
    for subparser in sub.choices.values():
        add_global_options(subparser, default=argparse.SUPPRESS)
    return parser.parse_args(argv)


def add_global_options(parser: argparse.ArgumentParser, default: object) -> None:
    """The options every subcommand also takes after its name (``blockfuse mount -v``):
    a subcommand's copy has no default (``SUPPRESS``), so that it does not undo the same
    option given before the subcommand."""
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="log debug detail"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="blockfuse: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except SpecError as exc:
        print(f"blockfuse: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(f"blockfuse: {exc}", file=sys.stderr)
        return exc.status
