"""The devices of a subcommand (``mount``, ``serve``): every spec checked before anything
is opened, then opened all or nothing, each wrapped as the options say."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass

from ..block import BlockDevice, label_layers
from ..devices.readonly import ReadOnlyDevice
from ..devices.safe import SafeDevice
from ..errors import BlockError
from ..opening import OpenContext
from ..spec import Options, Recipe, SpecError, compile_spec, split_named
from ..units import format_size, format_spec_size
from .common import CommandError

DEFAULT_NAME = "disk"
DEFAULT_IMAGE = "blockfuse-disk.img"
DEFAULT_SIZE = 1 << 30
DEFAULT_DEVICE = f"{DEFAULT_NAME}=sparse({DEFAULT_IMAGE}, size={format_spec_size(DEFAULT_SIZE)})"
"""The device of a mount (or server) given none, when ``DEFAULT_IMAGE`` does not exist."""

SPEC_HELP = (
    "SPEC: a path (a raw image or block device); file(PATH, ro=true, format=raw); "
    "sparse(PATH, size=SIZE, format=raw) (a sparse image, created if missing, resizable "
    "with truncate -s); mem(SIZE) or memory(SIZE) (in RAM); an NBD URI "
    "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (nbds:// and "
    "nbds+unix:// over TLS), or nbd(URI, timeout=SECONDS); "
    "mirror(PRIMARY, SECONDARY, state=PATH, chunk=SIZE, rate=BYTES_PER_S, verify=full) "
    "(copies PRIMARY onto SECONDARY in the background); safe(SPEC). Calls nest; quote "
    'paths holding commas or parentheses: file("a,b(1).img"). SIZE is in binary units: '
    "512, 64K, 256M, 1G, 1T, 1P (also lowercase, and with B or iB: 256MB is 256 MiB)."
)
"""What ``--help`` says about device specs (``tests/test_readme.py`` holds it to the parser)."""

log = logging.getLogger("blockfuse")


@dataclass(frozen=True)
class Opened:
    """One opened device, wrapped (``safe``, read-only) as asked, with its recipe."""

    name: str
    device: BlockDevice
    recipe: Recipe


def default_device() -> str:
    """The built-in default: a sparse 1 GiB image in the current directory, created (by
    the sparse device, when it opens) if missing; an existing one keeps its length (it
    may have been resized with ``truncate -s``)."""
    if os.path.exists(DEFAULT_IMAGE):
        return f"{DEFAULT_NAME}=sparse({DEFAULT_IMAGE})"
    log.warning("creating %s (%s, sparse)", DEFAULT_IMAGE, format_size(DEFAULT_SIZE))
    return DEFAULT_DEVICE


def compile_devices(
    specs: Sequence[str], option: str = "--device", *, read_only: bool = False
) -> list[tuple[str, Recipe]]:
    """Check every NAME=SPEC of ``option`` before anything is opened or created; with
    ``read_only`` (``--read-only``), images are opened read-only, without the write lock."""
    named = [split_named(text, option) for text in specs]
    names = [name for name, _ in named]
    for name in names:
        if names.count(name) > 1:
            raise SpecError(f"two devices are named {name!r}; each name must be unique")
    return [(name, compile_spec(spec, Options(read_only=read_only))) for name, spec in named]


async def open_recipe(name: str, recipe: Recipe, ctx: OpenContext) -> BlockDevice:
    try:
        return await recipe.open(ctx)
    except (OSError, ValueError, BlockError) as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        raise CommandError(f"cannot open device {name}={recipe.text}: {message}{where}") from exc


async def open_devices(
    recipes: Sequence[tuple[str, Recipe]],
    ctx: OpenContext,
    undo: AsyncExitStack,
    *,
    unsafe: bool,
    read_only: bool = False,
) -> list[Opened]:
    """Open every device (in ``safe(...)`` unless ``unsafe``, read-only if asked); each
    is closed by ``undo`` if a later step fails."""
    out: list[Opened] = []
    for name, recipe in recipes:
        device: BlockDevice = await open_recipe(name, recipe, ctx)
        undo.push_async_callback(device.aclose)
        if not (unsafe or recipe.text.startswith("safe(")):
            device = SafeDevice(device)
        if read_only:
            device = ReadOnlyDevice(device)
        label_layers(device, name)
        out.append(Opened(name, device, recipe))
    return out
