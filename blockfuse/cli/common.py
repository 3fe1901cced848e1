"""What every subcommand shares: exit statuses, the one-line failure, live-mount checks."""

from __future__ import annotations

import argparse

from ..fuse.mountpoint import answers, is_ours
from ..spec import SpecError, parse_size

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CommandError(Exception):
    """A failure to report in one line; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


def size_option(text: str) -> int:
    """argparse type for sizes: its error names the option's value and the units."""
    try:
        return parse_size(text)
    except SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_live_mount(mountpoint: str) -> None:
    """Raise ``CommandError`` unless ``mountpoint`` is a blockfuse mount that answers."""
    if not is_ours(mountpoint):
        raise CommandError(f"{mountpoint} is not a blockfuse mount")
    state = answers(mountpoint)
    if state is False:
        raise CommandError(
            f"{mountpoint} is a stale mount (its blockfuse died); "
            f"run: blockfuse umount {mountpoint}"
        )
    if state is None:
        raise CommandError(
            f"{mountpoint} does not answer (its blockfuse is stopped or stuck); "
            f"unmount it with: blockfuse umount {mountpoint}"
        )
