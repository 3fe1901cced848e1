"""``blockfuse mount``: compile the specs, open the devices all or nothing, serve the mount."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack

import trio

from .. import log as blockfuse_log
from .. import notify
from ..block import BlockDevice
from ..devices.safe import SafeDevice
from ..errors import BlockError
from ..fuse import ioflusher
from ..fuse.flatfile import FlatFile
from ..fuse.mount import serve
from ..fuse.mountpoint import MountError, Prepare, check_mountpoint, prepare_mountpoint
from ..fuse.scratch import ScratchDir, open_scratch_dir
from ..lifecycle import Alongside
from ..nbd.haggling import TLSPolicy
from ..opening import OpenContext, background_tasks, open_all, remove_created
from ..serve.exports import Export
from ..serve.listen import Listening
from ..serve.runtime import running
from ..spec import Recipe, SpecError
from ..swap import DEFAULT_UNIT
from ..transport.tlsserver import ServerTLS
from ..units import format_size
from . import config
from .common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError, size_option
from .devices import (
    DEFAULT_DEVICE,
    DEFAULT_IMAGE,
    SPEC_HELP,
    compile_devices,
    default_device,
    open_devices,
    open_recipe,
)
from .progress import progress_bar
from .serve import (
    add_tls_options,
    address_option,
    listen_or_fail,
    nbd_banner,
    server_tls,
    warn_without_tls,
)

log = logging.getLogger("blockfuse")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    mount = sub.add_parser(
        "mount",
        help="mount devices as flat files (runs in the foreground)",
        description=(
            "Show each device as the file MOUNTPOINT/NAME until Ctrl-C, SIGTERM or "
            "`blockfuse umount MOUNTPOINT`; every device is flushed before exit. "
            f"With no --device and no --scratch, shows {DEFAULT_DEVICE} (in the current "
            f"directory, created if missing; an existing {DEFAULT_IMAGE} keeps its size). "
            "A --scratch directory is temporary: everything in it is gone after unmount."
        ),
        epilog=SPEC_HELP,
    )
    mount.add_argument("mountpoint", nargs="?", help="the directory to mount on")
    mount.add_argument(config.HIDDEN_MOUNTPOINT, dest="config_mountpoint", help=argparse.SUPPRESS)
    mount.add_argument(
        "--device",
        "-d",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="a device to show as MOUNTPOINT/NAME (repeatable)",
    )
    mount.add_argument(
        "--scratch",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help=(
            "a scratch directory MOUNTPOINT/NAME/ whose files live on the device SPEC "
            "(repeatable); EVERYTHING IN IT IS GONE AFTER UNMOUNT, and the device's old "
            "contents are overwritten as files grow"
        ),
    )
    mount.add_argument(
        "--scratch-unit",
        type=size_option,
        default=DEFAULT_UNIT,
        metavar="SIZE",
        help="scratch space is given out in units of SIZE (default 1M): a file takes whole units",
    )
    mount.add_argument(
        "--read-only",
        action="store_true",
        help="refuse every write (EROFS); images are opened read-only, without the write lock",
    )
    mount.add_argument("--allow-other", action="store_true", help="let other users open the files")
    mount.add_argument(
        "--unsafe",
        action="store_true",
        help="do not wrap devices in safe(...) (skips the per-request contract checks)",
    )
    mount.add_argument(
        "--serve",
        action="append",
        default=[],
        type=address_option,
        metavar="ADDR",
        help=(
            "also export every device over NBD at ADDR: a socket path (with a /), "
            "HOST:PORT or :PORT (127.0.0.1) (repeatable); the same device objects, so "
            "NBD and the flat files see each other's writes at once"
        ),
    )
    add_tls_options(mount)


async def open_files(
    recipes: Sequence[tuple[str, Recipe]],
    ctx: OpenContext,
    undo: AsyncExitStack,
    *,
    unsafe: bool,
    read_only: bool = False,
) -> list[FlatFile]:
    """Open every device as a flat file; each is closed by ``undo`` if a later step fails."""
    opened = await open_devices(recipes, ctx, undo, unsafe=unsafe, read_only=read_only)
    return [FlatFile(o.name, o.device, kind=o.recipe.kind, spec=o.recipe.text) for o in opened]


async def open_scratch(
    recipes: Sequence[tuple[str, Recipe]],
    ctx: OpenContext,
    undo: AsyncExitStack,
    *,
    unsafe: bool,
    unit: int,
) -> list[ScratchDir]:
    dirs: list[ScratchDir] = []
    for index, (name, recipe) in enumerate(recipes):
        device: BlockDevice = await open_recipe(name, recipe, ctx)
        undo.push_async_callback(device.aclose)
        device = device if unsafe else SafeDevice(device)
        try:
            d = await open_scratch_dir(name, device, unit, index, recipe.kind, recipe.text)
        except BlockError as exc:
            raise CommandError(f"cannot use scratch {name}={recipe.text}: {exc}") from exc
        dirs.append(d)
    return dirs


def serving(devices: int, scratch_dirs: int) -> str:
    """``'2 devices and 1 scratch directory'``; the parts that are zero are left out."""
    counts = (
        (devices, "device", "devices"),
        (scratch_dirs, "scratch directory", "scratch directories"),
    )
    parts = [f"{n} {one if n == 1 else many}" for n, one, many in counts if n]
    return " and ".join(parts)


async def describe(
    mountpoint: str,
    files: Sequence[FlatFile],
    scratch: Sequence[ScratchDir] = (),
    listening: Listening | None = None,
    tls: TLSPolicy = TLSPolicy.OFF,
) -> str:
    lines = [f"blockfuse: serving {serving(len(files), len(scratch))} under {mountpoint}:"]
    for f in files:
        info = await f.info()
        ro = "" if info.read_write else ", read-only"
        lines.append(
            f"  {os.path.join(mountpoint, f.name)}  {format_size(info.size_bytes)}"
            f"  {f.kind} {f.spec}{ro}"
        )
    for d in scratch:
        lines.append(
            f"  {os.path.join(mountpoint, d.name)}/  scratch, {format_size(d.swap.capacity_bytes)}"
            f"  {d.kind} {d.spec}  (everything in it is gone after unmount)"
        )
    if listening is not None:
        lines += nbd_banner([f.name for f in files], listening, tls)
    lines.append(f"Stop with Ctrl-C or: blockfuse umount {shlex.quote(mountpoint)}")
    return "\n".join(lines)


async def run_mount(
    args: argparse.Namespace,
    recipes: list[tuple[str, Recipe]],
    scratch_recipes: Sequence[tuple[str, Recipe]] = (),
) -> int:
    listening = await listen_or_fail(args.serve) if args.serve else None
    try:
        return await _run_mount(args, recipes, scratch_recipes, listening)
    finally:
        if listening is not None:
            await listening.aclose()


async def _run_mount(
    args: argparse.Namespace,
    recipes: list[tuple[str, Recipe]],
    scratch_recipes: Sequence[tuple[str, Recipe]],
    listening: Listening | None,
) -> int:
    async with background_tasks() as nursery:  # devices' own tasks (NBD readers) live here
        async with open_all(nursery) as ctx, AsyncExitStack() as undo:
            # A failure closes what opened and removes what was created; copiers wait.
            files = await open_files(
                recipes, ctx, undo, unsafe=args.unsafe, read_only=args.read_only
            )
            scratch = await open_scratch(
                scratch_recipes, ctx, undo, unsafe=args.unsafe, unit=args.scratch_unit
            )
            try:
                prepare_mountpoint(args.mountpoint, args.prepare)
            except MountError as exc:
                raise CommandError(str(exc)) from exc
            undo.pop_all()
        try:
            return await mount_files(args, files, scratch, listening)
        except MountError as exc:  # the devices are closed: undo what opening them made
            remove_created(ctx.created)
            if args.prepare is Prepare.CREATE:
                with contextlib.suppress(OSError):
                    os.rmdir(args.mountpoint)
            raise CommandError(str(exc)) from exc


@contextlib.asynccontextmanager
async def serving_beside(
    files: Sequence[FlatFile], listening: Listening | None, tls: ServerTLS | None = None
) -> AsyncIterator[Alongside | None]:
    """The NBD server on the mount's own flat files (``--serve``), or ``None``."""
    if listening is None:
        yield None
        return
    exports = [Export(f.name, f, f.kind, f.spec) for f in files]
    async with running(exports, listening, tls=tls) as serving:
        yield serving


async def mount_files(
    args: argparse.Namespace,
    files: list[FlatFile],
    scratch: Sequence[ScratchDir],
    listening: Listening | None = None,
) -> int:
    tls: ServerTLS | None = getattr(args, "server_tls", None)
    policy = tls.policy if tls is not None else TLSPolicy.OFF
    banner = await describe(args.mountpoint, files, scratch, listening, policy)
    if listening is not None:
        warn_without_tls(listening, policy)
    what = f"{serving(len(files), len(scratch))} under {args.mountpoint}"

    def ready() -> None:
        print(banner, file=sys.stderr, flush=True)
        log.info("mounted: %s", what)
        ioflusher.report(getattr(args, "io_flusher", None))
        notify.ready(f"serving {what}")

    bar = progress_bar(files, blockfuse_log.console())
    async with bar, serving_beside(files, listening, tls) as alongside:
        problems = await serve(
            args.mountpoint,
            files,
            read_only=args.read_only,
            allow_other=args.allow_other,
            on_ready=ready,
            scratch=scratch,
            alongside=alongside,
        )
    for problem in problems:
        print(f"blockfuse: {problem}", file=sys.stderr)
    print(f"blockfuse: unmounted {args.mountpoint}", file=sys.stderr)
    return EXIT_FAILED if problems else EXIT_OK


def cmd_mount(args: argparse.Namespace) -> int:
    use_default = not args.device and not args.scratch
    recipes = compile_devices(args.device, read_only=args.read_only)
    scratch_recipes = compile_devices(args.scratch, "--scratch")
    if args.scratch_unit <= 0 or args.scratch_unit % 512:
        raise SpecError(f"--scratch-unit {args.scratch_unit} is not a positive multiple of 512")
    clash = {name for name, _ in recipes} & {name for name, _ in scratch_recipes}
    if clash:
        raise SpecError(f"{sorted(clash)[0]!r} names both a device and a scratch directory")
    try:
        args.prepare = check_mountpoint(args.mountpoint)
    except MountError as exc:
        raise CommandError(str(exc)) from exc
    args.server_tls = server_tls(args)
    if args.server_tls.policy is not TLSPolicy.OFF and not args.serve:
        raise CommandError("--tls needs --serve ADDR (it is the NBD server's)", EXIT_USAGE)
    if use_default:
        recipes = compile_devices([default_device()], read_only=args.read_only)
    args.io_flusher = ioflusher.set_io_flusher()  # before any thread starts: they inherit it
    return trio.run(run_mount, args, recipes, scratch_recipes)
