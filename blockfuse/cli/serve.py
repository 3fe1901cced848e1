"""``blockfuse serve``: export devices over NBD, in the foreground, until a signal.

    blockfuse serve -d disk=SPEC --socket ./vm1.sock [--control ./vm1.ctl]
    blockfuse serve -d disk=SPEC --listen 127.0.0.1:10809
    nbdinfo -- [ blockfuse serve -d disk=SPEC ]          # socket activation, no address

The specs are checked and the addresses bound before any device opens (a bad address
changes nothing).  The control socket defaults to the first ``--socket`` with ``.ctl``
for its suffix (``vm1.sock`` -> ``vm1.ctl``); without a Unix socket there is none unless
``--control`` names it.  No FUSE is needed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack

import trio

from .. import notify
from ..nbd.haggling import TLSPolicy
from ..opening import background_tasks, open_all
from ..sectors import DeviceBytes
from ..serve.exports import Export
from ..serve.listen import (
    Address,
    ListenError,
    Listening,
    activated_fds,
    listen,
    parse_address,
    take_activated,
    tls_warning,
)
from ..serve.runtime import serve_exports
from ..spec import Recipe
from ..transport.tlsserver import ServerTLS, TLSSetupError
from ..units import format_size
from . import registry
from .common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError
from .devices import compile_devices, default_device, open_devices

CONTROL_MODE = 0o600

log = logging.getLogger(__name__)


def address_option(text: str) -> Address:
    """argparse type for a listening address (see ``serve/listen.py``)."""
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def socket_option(text: str) -> Address:
    return Address(path=text)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = sub.add_parser(
        "serve",
        help="export devices over NBD (runs in the foreground)",
        description=(
            "Export each device as the NBD export NAME (the first also as the default "
            "export) until Ctrl-C or SIGTERM; then stop accepting, answer new requests "
            "with ESHUTDOWN, let those in flight finish, flush every device and exit. "
            "Without --socket or --listen, serves the sockets handed over by socket "
            "activation (LISTEN_FDS)."
        ),
        epilog="SPEC: as for `blockfuse mount` (see `blockfuse mount --help`).",
    )
    serve.add_argument(
        "--device", "-d", action="append", default=[], metavar="NAME=SPEC",
        help="a device to export as NAME (repeatable)",
    )  # fmt: skip
    serve.add_argument(
        "--socket", action="append", default=[], type=socket_option, metavar="PATH",
        help="listen on the Unix socket PATH (repeatable)",
    )  # fmt: skip
    serve.add_argument(
        "--listen", action="append", default=[], type=address_option, metavar="HOST:PORT",
        help="listen on TCP (repeatable; :PORT is 127.0.0.1; anything else is reachable "
        "from elsewhere: use --tls=require there)",
    )  # fmt: skip
    serve.add_argument(
        "--control", metavar="PATH",
        help="the control socket for `blockfuse status` and `pivot` (default: next to the "
        "first --socket, with the suffix .ctl)",
    )  # fmt: skip
    serve.add_argument("--read-only", action="store_true", help="refuse every write (EPERM)")
    serve.add_argument(
        "--unsafe", action="store_true",
        help="do not wrap devices in safe(...) (skips the per-request contract checks)",
    )  # fmt: skip
    serve.add_argument(
        "--no-list", action="store_true",
        help="refuse to list the exports (NBD_REP_ERR_POLICY); they still open by name",
    )  # fmt: skip
    add_tls_options(serve)


def add_tls_options(parser: argparse.ArgumentParser) -> None:
    """``--tls``, ``--tls-certificates``, ``--tls-verify-peer`` (serve and mount --serve)."""
    parser.add_argument(
        "--tls", choices=[p.value for p in TLSPolicy],
        help="NBD over TLS (STARTTLS): off, on (offered; plaintext clients are served too) "
        "or require (every option before STARTTLS is refused with NBD_REP_ERR_TLS_REQD); "
        "default: require with --tls-certificates, else off",
    )  # fmt: skip
    parser.add_argument(
        "--tls-certificates", metavar="DIR",
        help="the server's certificate: DIR/server-cert.pem and DIR/server-key.pem (mode "
        "0600), and DIR/ca-cert.pem for --tls-verify-peer (the layout of nbdkit and qemu)",
    )  # fmt: skip
    parser.add_argument(
        "--tls-verify-peer", action="store_true",
        help="demand a client certificate signed by DIR/ca-cert.pem",
    )  # fmt: skip


def server_tls(args: argparse.Namespace) -> ServerTLS:
    """The TLS configuration the options ask for, its files read; one-line errors."""
    policy = TLSPolicy(args.tls or ("require" if args.tls_certificates else "off"))
    if policy is TLSPolicy.OFF and (args.tls_certificates or args.tls_verify_peer):
        given = "--tls-certificates" if args.tls_certificates else "--tls-verify-peer"
        raise CommandError(f"{given} needs --tls=on or --tls=require", EXIT_USAGE)
    try:
        return ServerTLS.load(policy, args.tls_certificates, verify_peer=args.tls_verify_peer)
    except TLSSetupError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from exc


def control_path(args: argparse.Namespace) -> str | None:
    if args.control:
        return str(args.control)
    if not args.socket:
        return None
    path = str(args.socket[0].path)
    stem, ext = os.path.splitext(path)
    return f"{stem}.ctl" if ext != ".ctl" else f"{path}.ctl"


async def listen_or_fail(addresses: Sequence[Address], *, mode: int | None = None) -> Listening:
    try:
        return await listen(list(addresses), mode=mode)
    except ListenError as exc:
        raise CommandError(str(exc)) from exc


def warn_without_tls(listening: Listening, tls: TLSPolicy = TLSPolicy.OFF) -> None:
    for address in listening.addresses:
        if (warning := tls_warning(address, tls)) is not None:
            print(f"blockfuse: {warning}", file=sys.stderr)


def nbd_banner(
    names: Sequence[str], listening: Listening, tls: TLSPolicy = TLSPolicy.OFF
) -> list[str]:
    """The URIs of every export at every address, for the banner."""
    lines = []
    for address in listening.addresses:
        lines.append(f"  NBD on {address}{TLS_NOTE[tls]}:")
        lines += [f"    {address.uri(name, tls=tls is TLSPolicy.REQUIRE)}" for name in names]
    return lines


TLS_NOTE = {TLSPolicy.OFF: "", TLSPolicy.ON: " (TLS offered)", TLSPolicy.REQUIRE: " (TLS only)"}


async def describe(
    exports: Sequence[Export], listening: Listening, control: str | None, tls: TLSPolicy
) -> str:
    lines = [f"blockfuse: serving {len(exports)} device{'s' if len(exports) != 1 else ''}:"]
    for e in exports:
        info = await e.bytes.info()
        ro = "" if info.read_write else ", read-only"
        lines.append(f"  {e.name}  {format_size(info.size_bytes)}  {e.kind} {e.spec}{ro}")
    lines += nbd_banner([e.name for e in exports], listening, tls)
    if control is not None:
        lines.append(f"  control: {control} (blockfuse status {control})")
    lines.append("Stop with Ctrl-C or SIGTERM")
    return "\n".join(lines)


async def run_serve(
    args: argparse.Namespace, recipes: list[tuple[str, Recipe]], tls: ServerTLS
) -> int:
    control = control_path(args)
    if control is None and registry.ensure_runtime_dir() is not None:
        control = registry.default_control()  # every server can be asked (registry.py)
    fds = activated_fds()
    if fds and not (args.socket or args.listen):
        try:
            listening = take_activated(fds)
        except ListenError as exc:
            raise CommandError(str(exc)) from exc
    else:
        listening = await listen_or_fail([*args.socket, *args.listen])
    try:
        controlling = None
        if control is not None:
            controlling = await listen_or_fail([Address(path=control)], mode=CONTROL_MODE)
        return await serve_devices(args, recipes, listening, controlling, control, tls)
    finally:
        await listening.aclose()


async def serve_devices(
    args: argparse.Namespace,
    recipes: list[tuple[str, Recipe]],
    listening: Listening,
    controlling: Listening | None,
    control: str | None,
    tls: ServerTLS,
) -> int:
    try:
        async with background_tasks() as nursery:
            async with open_all(nursery) as ctx, AsyncExitStack() as undo:
                opened = await open_devices(
                    recipes, ctx, undo, unsafe=args.unsafe, read_only=args.read_only
                )
                undo.pop_all()
            exports = [
                Export(o.name, DeviceBytes(o.device), o.recipe.kind, o.recipe.text) for o in opened
            ]
            banner = await describe(exports, listening, control, tls.policy)
            warn_without_tls(listening, tls.policy)

            def ready() -> None:
                print(banner, file=sys.stderr, flush=True)
                where = ", ".join(str(a) for a in listening.addresses) or "nothing"
                log.info("serving %d device(s) on %s", len(exports), where)
                notify.ready(f"serving {len(exports)} device(s) on {where}")

            with registry.registered(control):
                problems = await serve_exports(
                    exports,
                    listening,
                    controlling,
                    sys.stderr,
                    listing=not args.no_list,
                    tls=tls,
                    on_ready=ready,
                )
    finally:
        if controlling is not None:
            await controlling.aclose()
    for problem in problems:
        print(f"blockfuse: {problem}", file=sys.stderr)
    print("blockfuse: stopped serving", file=sys.stderr)
    return EXIT_FAILED if problems else EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    recipes = compile_devices(args.device, read_only=args.read_only)
    if not (args.socket or args.listen or activated_fds()):
        raise CommandError(
            "nothing to listen on: give --socket PATH or --listen HOST:PORT "
            "(or start blockfuse serve by socket activation)",
            EXIT_USAGE,
        )
    tls = server_tls(args)
    if not recipes:
        recipes = compile_devices([default_device()], read_only=args.read_only)
    return trio.run(run_serve, args, recipes, tls)
