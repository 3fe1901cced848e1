"""``blockfuse ls URI``: the exports of an NBD server, one per line, or (``--json``) a
list of ``{"name", "size", "description"}`` with the size in bytes (``null`` when the
server did not say)."""

from __future__ import annotations

import argparse
import json

import trio

from ..errors import BlockError
from ..nbd.uri import BadURI, parse_uri
from ..transport.connect import list_exports
from ..units import format_size, printable
from .common import EXIT_OK, EXIT_USAGE, CommandError


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ls = sub.add_parser(
        "ls",
        help="list the exports of an NBD server",
        description="Print the server's exports, one per line: name, size, description.",
    )
    ls.add_argument(
        "uri",
        help="nbd://HOST[:PORT]/ or nbd+unix:///?socket=PATH; over TLS nbds://... or "
        "nbds+unix://... (with tls-certificates=DIR, tls-hostname=NAME, tls-verify-peer=false)",
    )
    ls.add_argument(
        "--json", action="store_true",
        help="print a JSON list of {name, size, description}, sizes in bytes",
    )  # fmt: skip


def cmd_ls(args: argparse.Namespace) -> int:
    try:
        address = parse_uri(args.uri)
    except BadURI as exc:
        raise CommandError(f"{args.uri!r}: {exc}", EXIT_USAGE) from exc
    try:
        exports = trio.run(list_exports, address)
    except BlockError as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        listed = [{"name": e.name, "size": e.size, "description": e.description} for e in exports]
        print(json.dumps(listed, indent=2))
        return EXIT_OK
    for export in exports:
        size = format_size(export.size) if export.size is not None else "?"
        name = printable(export.name) or '""'
        print(f"{name}\t{size}\t{printable(export.description)}")
    return EXIT_OK
