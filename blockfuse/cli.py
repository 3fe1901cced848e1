"""The ``blockfuse`` command."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

import trio

from . import __version__
from .background import all_or_nothing, background_tasks
from .block import BlockDevice
from .devices.readonly import ReadOnlyDevice
from .devices.safe import SafeDevice
from .errors import BlockError
from .fuse.flatfile import FlatFile
from .fuse.mount import (
    FSNAME,
    MountError,
    answers,
    check_mountpoint,
    close_all,
    loop_devices_using,
    mount_pid,
    mount_type,
    prepare_mountpoint,
    resolved,
    serve,
    unmount_command,
)
from .fuse.scratch import ScratchDir, open_scratch_dir
from .monitor import MonitorError, pivot, progress_bar, status_report
from .nbd.uri import BadURI, parse_uri
from .spec import Recipe, SpecError, compile_spec, parse_size, split_named
from .swap import DEFAULT_UNIT
from .transport.connect import list_exports
from .units import format_size, printable

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

DEFAULT_NAME = "disk"
DEFAULT_IMAGE = "blockfuse-disk.img"
DEFAULT_SIZE = 1 << 30

log = logging.getLogger("blockfuse")


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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="blockfuse",
        description="Compose block devices and show each as a flat file in a FUSE mount.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    parser.add_argument("--version", action="version", version=f"blockfuse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = sub.add_parser(
        "mount",
        help="mount devices as flat files (runs in the foreground)",
        description=(
            "Show each device as the file MOUNTPOINT/NAME until Ctrl-C, SIGTERM or "
            "`blockfuse umount MOUNTPOINT`; every device is flushed before exit. "
            f"With no --device and no --scratch, shows {DEFAULT_NAME}={DEFAULT_IMAGE} (1 GiB, "
            "created sparse in the current directory if missing). "
            "A --scratch directory is temporary: everything in it is gone after unmount."
        ),
        epilog=(
            "SPEC: a path (raw image or block device); file(PATH, ro=true); mem(SIZE) "
            "(sizes like 512, 64K, 256M, 1G, 1T); sparse(PATH, size=SIZE) (a sparse image, "
            "created if missing, resizable with truncate -s); safe(SPEC); an NBD URI "
            "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH; "
            "mirror(PRIMARY, SECONDARY, state=PATH, chunk=SIZE, rate=BYTES_PER_S) "
            "(copies PRIMARY onto SECONDARY in the background). Calls nest; "
            "quote paths holding commas or parentheses."
        ),
    )
    mount.add_argument("mountpoint")
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
    mount.add_argument("--read-only", action="store_true", help="refuse every write (EROFS)")
    mount.add_argument("--allow-other", action="store_true", help="let other users open the files")
    mount.add_argument(
        "--unsafe",
        action="store_true",
        help="do not wrap devices in safe(...) (skips the per-request contract checks)",
    )

    umount = sub.add_parser(
        "umount",
        help="unmount a blockfuse mount",
        description=(
            "Unmount a blockfuse mount (a live one's blockfuse flushes and exits; a stale "
            "one, left by a killed blockfuse, is cleared). Other filesystems are refused."
        ),
    )
    umount.add_argument("mountpoint")

    ls = sub.add_parser(
        "ls",
        help="list the exports of an NBD server",
        description="Print the server's exports, one per line: name, size, description.",
    )
    ls.add_argument("uri", help="nbd://HOST[:PORT]/ or nbd+unix:///?socket=PATH")

    status = sub.add_parser(
        "status",
        help="show every device's status (a mirror's copy)",
        description=(
            "Print each device of a live mount: kind, size, spec, and a mirror's copy "
            "state, progress, rate, ETA and errors."
        ),
    )
    status.add_argument("mountpoint")

    pivot_ = sub.add_parser(
        "pivot",
        help="detach a synced mirror's primary; the secondary serves alone from then on",
        description=(
            "Once a mirror is synced: flush both sides, close the primary, and serve all "
            "I/O from the secondary. Refused (nothing changes) while the copy runs."
        ),
    )
    pivot_.add_argument("file", metavar="MOUNTPOINT/NAME")
    return parser.parse_args(argv)


# --- mount ---------------------------------------------------------------------------


def default_device() -> str:
    """The built-in default: a sparse 1 GiB image in the current directory, created (by
    the sparse device, when it opens) if missing; an existing one keeps its length (it
    may have been resized with ``truncate -s``)."""
    if os.path.exists(DEFAULT_IMAGE):
        return f"{DEFAULT_NAME}=sparse({DEFAULT_IMAGE})"
    log.warning("creating %s (%s, sparse)", DEFAULT_IMAGE, format_size(DEFAULT_SIZE))
    return f"{DEFAULT_NAME}=sparse({DEFAULT_IMAGE}, size={DEFAULT_SIZE >> 30}G)"


def compile_devices(specs: Sequence[str], option: str = "--device") -> list[tuple[str, Recipe]]:
    """Check every NAME=SPEC of ``option`` before anything is opened or created."""
    named = [split_named(text, option) for text in specs]
    names = [name for name, _ in named]
    for name in names:
        if names.count(name) > 1:
            raise SpecError(f"two devices are named {name!r}; each name must be unique")
    return [(name, compile_spec(spec)) for name, spec in named]


async def open_files(
    recipes: Sequence[tuple[str, Recipe]], *, unsafe: bool, read_only: bool = False
) -> list[FlatFile]:
    files: list[FlatFile] = []
    try:
        for name, recipe in recipes:
            device: BlockDevice = await open_recipe(name, recipe)
            if not (unsafe or recipe.text.startswith("safe(")):
                device = SafeDevice(device)
            if read_only:
                device = ReadOnlyDevice(device)
            files.append(FlatFile(name, device, kind=recipe.kind, spec=recipe.text))
    except BaseException:
        for f in files:
            await f.device.aclose()
        raise
    return files


async def open_recipe(name: str, recipe: Recipe) -> BlockDevice:
    try:
        return await recipe.open()
    except (OSError, ValueError, BlockError) as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        raise CommandError(f"cannot open device {name}={recipe.text}: {message}{where}") from exc


async def open_scratch(
    recipes: Sequence[tuple[str, Recipe]], *, unsafe: bool, unit: int
) -> list[ScratchDir]:
    dirs: list[ScratchDir] = []
    try:
        for index, (name, recipe) in enumerate(recipes):
            device: BlockDevice = await open_recipe(name, recipe)
            device = device if unsafe else SafeDevice(device)
            try:
                d = await open_scratch_dir(name, device, unit, index, recipe.kind, recipe.text)
            except BlockError as exc:
                raise CommandError(f"cannot use scratch {name}={recipe.text}: {exc}") from exc
            dirs.append(d)
    except BaseException:
        for d in dirs:
            await d.aclose()
        raise
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
    mountpoint: str, files: Sequence[FlatFile], scratch: Sequence[ScratchDir] = ()
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
    lines.append(f"Stop with Ctrl-C or: blockfuse umount {shlex.quote(mountpoint)}")
    return "\n".join(lines)


async def run_mount(
    args: argparse.Namespace,
    recipes: list[tuple[str, Recipe]],
    scratch_recipes: Sequence[tuple[str, Recipe]] = (),
) -> int:
    async with background_tasks():  # devices' own tasks (NBD readers) live here
        return await mount_files(args, recipes, scratch_recipes)


async def mount_files(
    args: argparse.Namespace,
    recipes: list[tuple[str, Recipe]],
    scratch_recipes: Sequence[tuple[str, Recipe]],
) -> int:
    async with all_or_nothing():  # a failure leaves no file it created; copiers wait
        files = await open_files(recipes, unsafe=args.unsafe, read_only=args.read_only)
        try:
            scratch = await open_scratch(
                scratch_recipes, unsafe=args.unsafe, unit=args.scratch_unit
            )
        except BaseException:
            for f in files:
                await f.device.aclose()
            raise
        try:
            prepare_mountpoint(args.mountpoint, args.prepare)
        except MountError as exc:
            await close_all(files, scratch)
            raise CommandError(str(exc)) from exc
    banner = await describe(args.mountpoint, files, scratch)
    async with progress_bar(files, sys.stderr):
        problems = await serve(
            args.mountpoint,
            files,
            read_only=args.read_only,
            allow_other=args.allow_other,
            on_ready=lambda: print(banner, file=sys.stderr, flush=True),
            scratch=scratch,
        )
    for problem in problems:
        print(f"blockfuse: {problem}", file=sys.stderr)
    print(f"blockfuse: unmounted {args.mountpoint}", file=sys.stderr)
    return EXIT_FAILED if problems else EXIT_OK


def cmd_mount(args: argparse.Namespace) -> int:
    use_default = not args.device and not args.scratch
    recipes = compile_devices(args.device)
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
    if use_default:
        recipes = compile_devices([default_device()])
    try:
        return trio.run(run_mount, args, recipes, scratch_recipes)
    except MountError as exc:
        raise CommandError(str(exc)) from exc


# --- umount --------------------------------------------------------------------------

UMOUNT_WAIT_SECONDS = 120.0
"""How long ``umount`` waits for the blockfuse it unmounted to close its devices (a
mirror stops its copier within 10 s, then flushes both sides)."""


def cmd_umount(args: argparse.Namespace) -> int:
    path = args.mountpoint
    try:
        fstype = mount_type(path)
    except OSError as exc:
        raise CommandError(f"cannot read the mount table: {exc}") from exc
    if fstype is None:
        raise CommandError(f"{path} is not mounted")
    if fstype != "fuse." + FSNAME:
        raise CommandError(f"{path} is a {fstype} mount, not blockfuse's; leaving it alone")
    # Never touch the mountpoint itself: a stopped blockfuse would not answer.  Unmounting
    # a live mount ends its blockfuse (it flushes and exits); a stale one is just cleared.
    pid = mount_pid(path)
    result = subprocess.run(unmount_command(path, lazy=False), capture_output=True, text=True)
    if result.returncode != 0:
        raise CommandError(f"unmounting {path} failed: {result.stderr.strip()}{why_busy(path)}")
    if pid is not None:
        wait_for_exit(pid, path)
    return EXIT_OK


def wait_for_exit(pid: int, path: str, limit: float = UMOUNT_WAIT_SECONDS) -> None:
    """Wait until blockfuse ``pid`` has closed its devices (flushed, maps saved) and
    exited, so that a new mount can open them at once."""
    started = time.monotonic()
    told = False
    while is_blockfuse(pid):
        if process_state(pid) in ("T", "t"):
            print(f"blockfuse: pid {pid} is stopped; it closes its devices once continued "
                  f"(kill -CONT {pid})", file=sys.stderr)  # fmt: skip
            return
        waited = time.monotonic() - started
        if waited > limit:
            raise CommandError(
                f"{path} is unmounted, but blockfuse (pid {pid}) is still closing its "
                f"devices after {limit:.0f} s; wait for it before mounting them again"
            )
        if waited > 1 and not told:
            print(f"blockfuse: waiting for pid {pid} to flush and close its devices",
                  file=sys.stderr)  # fmt: skip
            told = True
        time.sleep(0.05)


def is_blockfuse(pid: int) -> bool:
    """Whether ``pid`` runs and is a blockfuse (not a later process given the number)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"blockfuse" in f.read() and process_state(pid) not in ("Z", "X", "")
    except OSError:
        return False


def process_state(pid: int) -> str:
    """The one-letter state of ``pid`` from /proc (R, S, D, T, Z...; "" if gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return ""


def why_busy(path: str) -> str:
    """The loop devices that keep ``path`` busy, with how to detach them ("" if none)."""
    devices = loop_devices_using(resolved(path))
    if not devices:
        return ""
    verb = "uses" if len(devices) == 1 else "use"
    return f" ({', '.join(devices)} still {verb} it; detach first: losetup -d {' '.join(devices)})"


# --- ls ------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    try:
        address = parse_uri(args.uri)
    except BadURI as exc:
        raise CommandError(f"{args.uri!r}: {exc}", EXIT_USAGE) from exc
    try:
        exports = trio.run(list_exports, address)
    except BlockError as exc:
        raise CommandError(str(exc)) from exc
    for export in exports:
        size = format_size(export.size) if export.size is not None else "?"
        name = printable(export.name) or '""'
        print(f"{name}\t{size}\t{printable(export.description)}")
    return EXIT_OK


# --- status and pivot ------------------------------------------------------------------


def check_live_mount(mountpoint: str) -> None:
    """Raise ``CommandError`` unless ``mountpoint`` is a blockfuse mount that answers."""
    if mount_type(mountpoint) != "fuse." + FSNAME:
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


def cmd_status(args: argparse.Namespace) -> int:
    check_live_mount(args.mountpoint)
    try:
        print(status_report(args.mountpoint))
    except OSError as exc:
        raise CommandError(f"cannot read the status under {args.mountpoint}: {exc}") from exc
    return EXIT_OK


def cmd_pivot(args: argparse.Namespace) -> int:
    # The mount table first, then a bounded probe: a stopped blockfuse never answers.
    mountpoint = os.path.dirname(os.path.abspath(args.file))
    if mount_type(mountpoint) != "fuse." + FSNAME:
        if mount_type(args.file) == "fuse." + FSNAME:
            raise CommandError(f"{args.file} is a mountpoint; name the device: {args.file}/NAME")
        raise CommandError(f"{args.file} is not a device in a blockfuse mount")
    check_live_mount(mountpoint)
    try:
        state = pivot(args.file)
    except MonitorError as exc:
        raise CommandError(str(exc)) from exc
    print(f"blockfuse: {args.file} is {state}; the primary is detached", file=sys.stderr)
    return EXIT_OK


COMMANDS = {
    "mount": cmd_mount,
    "umount": cmd_umount,
    "ls": cmd_ls,
    "status": cmd_status,
    "pivot": cmd_pivot,
}


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


if __name__ == "__main__":
    sys.exit(main())
