"""Device kinds: a spec's syntax tree turned into a ``Recipe``, checked, ready to open.

A bare word is a path (a raw image file or block device) or an NBD URI
(``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``, and over TLS
``nbds://...``, ``nbds+unix://...``).  Examples::

    ./disk.img    file(./disk.img, ro=true)    mem(256M)    safe(mem(1G))
    file("/images/odd,name(1).img")    nbd://10.0.0.5/disk0    safe(nbd+unix:///?socket=/s)
    sparse(./big.img, size=1T)    mirror(nbd://h/vm, sparse(./vm.img), state=./vm.map)

Opening is two steps so that bad input changes nothing: ``compile_spec`` parses and
checks every argument (kinds, sizes, that files exist) and returns a ``Recipe``; only
then does ``recipe.open(ctx)`` create or open anything, with the ``OpenContext`` the
caller passes down (``blockfuse.opening``).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import trio

from ..block import BlockDevice
from ..devices.file import open_file
from ..devices.images import IMAGE_HEAD, check_head, empty_image
from ..devices.memory import MemoryDevice
from ..devices.mirror import DEFAULT_CHUNK, MirrorRefused, check_options, prepare_mirror
from ..devices.remote import DEFAULT_TIMEOUT, open_remote
from ..devices.safe import SafeDevice
from ..devices.sparse import check_backing, open_sparse
from ..nbd.uri import BadURI, parse_uri
from ..opening import OpenContext, open_all
from ..transport.handshake import TLSFailed
from ..transport.tls import client_context
from .binding import arg, bind
from .grammar import QUOTE_HINT, Call, Node, SpecError, Word, parse, quoted, unparse
from .values import (
    bool_arg,
    existing_path,
    format_arg,
    optional_size,
    path_arg,
    size_arg,
    sparse_size_arg,
    state_path,
    timeout_arg,
    uri_arg,
    verify_arg,
)

Opener = Callable[[OpenContext], Awaitable[BlockDevice]]
SizedOpener = Callable[[OpenContext, int], Awaitable[BlockDevice]]


@dataclass
class Recipe:
    """A checked spec, ready to open.  ``kind`` is the outermost kind the user wrote.

    ``open_sized(ctx, size_bytes)``, where a kind offers it (``sparse``), opens the device
    with a size another device dictates: a mirror opens its primary, then its secondary
    with the primary's size.  Compile such a secondary with ``Options(size_from_peer=True)``
    so that a missing file without ``size=`` is not an error.
    """

    kind: str
    text: str
    open: Opener
    children: list[Recipe] = field(default_factory=list)
    open_sized: SizedOpener | None = None
    images: tuple[str, ...] = ()
    """The image files (or block devices) the device opens, for telling two devices
    that would use one image apart before anything opens."""

    async def open_alone(self, nursery: trio.Nursery) -> BlockDevice:
        """Open this one device as a mount opens its set (``open_all``): background
        tasks in ``nursery``, created files removed on failure, copier started after."""
        async with open_all(nursery) as ctx:
            device = await self.open(ctx)
        return device


@dataclass(frozen=True)
class Options:
    """How a spec is compiled: ``size_from_peer`` for a mirror's secondary; ``read_only``
    for a read-only mount (``--read-only``): every image is opened as ``file(PATH,
    ro=true)`` is, read-only and without the write lock, but a mirror's secondary, which
    its copier writes."""

    size_from_peer: bool = False
    read_only: bool = False


def device_arg(node: Node, options: Options) -> Recipe:
    return compile_node(node, options)


def secondary_arg(node: Node, options: Options) -> Recipe:
    """A mirror's secondary: a new ``sparse(PATH)`` may leave its size to the primary."""
    return compile_node(node, Options(size_from_peer=True))


# --- kinds -------------------------------------------------------------------------------

KindCompiler = Callable[[Call, Options], Recipe]
KINDS: dict[str, KindCompiler] = {}
ARGUMENTS: dict[str, type] = {}
"""Each kind's argument record (``binding.py``): what it takes, in order."""


def kind(*names: str, args: type) -> Callable[[KindCompiler], KindCompiler]:
    """Register a kind under ``names`` (the first is its name, the others aliases)."""

    def register(fn: KindCompiler) -> KindCompiler:
        for name in names:
            KINDS[name] = fn
            ARGUMENTS[name] = args
        return fn

    return register


@dataclass(frozen=True)
class FileArgs:
    path: str = arg(existing_path)
    ro: bool = arg(bool_arg, False)
    format: str | None = arg(format_arg, None)


@kind("file", args=FileArgs)
def compile_file(call: Call, options: Options) -> Recipe:
    check_not_cut(call)
    args = bind(call, FileArgs, options)
    read_only = args.ro or options.read_only
    check_file_access(args.path, read_only, args.format)
    return file_recipe(args.path, read_only, unparse(call), args.format)


def file_recipe(path: str, read_only: bool, text: str, format: str | None = None) -> Recipe:
    async def open_(ctx: OpenContext) -> BlockDevice:
        return open_file(path, read_only=read_only, format=format)

    return Recipe("file", text, open_, images=(path,))


def check_file_access(
    path: str, read_only: bool, format: str | None = None, *, empty_ok: bool = False
) -> None:
    """What opening ``path`` as a raw image would find wrong, found without opening it
    (``empty_ok``: a sparse image given its size may be an empty file)."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise SpecError(f"{path} is a directory, not an image file or block device")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise SpecError(f"{path} is not a regular file or block device")
    check_image_format(path, format)
    if stat.S_ISREG(st.st_mode) and st.st_size == 0 and not empty_ok:
        raise SpecError(empty_image(path))
    if stat.S_ISREG(st.st_mode) and st.st_size % 512:
        raise SpecError(
            f"{path} is {st.st_size} bytes, not a whole number of 512-byte sectors "
            f"(use sparse({path}, size=...) or `truncate -s` it to a multiple of 512)"
        )
    if not os.access(path, os.R_OK if read_only else os.R_OK | os.W_OK):
        mode = "reading" if read_only else "reading and writing"
        raise SpecError(f"{path} cannot be opened for {mode} (permission denied)")


def check_not_cut(call: Call) -> None:
    """Refuse a path written unquoted whose commas cut it into arguments (``file(a,b.img)``
    is ``file(a, ro=b.img)``), found when the pieces joined again name a file."""
    words: list[str] = []
    for node in call.args:
        if not isinstance(node, Word) or node.quoted:
            break
        words.append(node.text)
        joined = ",".join(words)
        if len(words) > 1 and os.path.exists(joined):
            raise SpecError(
                f"{call.kind}(...) got the path {joined} cut at its commas; "
                f"{QUOTE_HINT}: {quoted(joined)}"
            )


def check_image_format(path: str, format: str | None) -> None:
    """Refuse an image of another format (qcow2, VMDK, ...) unless ``format`` says raw;
    one that cannot be read is left to the access check."""
    if format == "raw":
        return
    try:
        mode = os.stat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            return  # the type check says what is wrong (a FIFO would block the read)
        with open(path, "rb") as f:
            head = f.read(IMAGE_HEAD)
    except OSError:
        return
    try:
        check_head(head, path, format)
    except ValueError as exc:
        raise SpecError(str(exc)) from None


@dataclass(frozen=True)
class MemoryArgs:
    size: int = arg(size_arg)


@kind("mem", "memory", args=MemoryArgs)
def compile_memory(call: Call, options: Options) -> Recipe:
    size = bind(call, MemoryArgs, options).size
    if size == 0:
        raise SpecError("a memory device needs a size above 0 (e.g. mem(256M))")
    if size % 512:
        raise SpecError(f"memory size {size} is not a whole number of 512-byte sectors")

    async def open_(ctx: OpenContext) -> BlockDevice:
        return MemoryDevice(size)

    return Recipe("memory", unparse(call), open_)


@dataclass(frozen=True)
class WrapperArgs:
    device: Recipe = arg(device_arg)


@kind("safe", args=WrapperArgs)
def compile_safe(call: Call, options: Options) -> Recipe:
    inner = bind(call, WrapperArgs, options).device

    async def open_(ctx: OpenContext) -> BlockDevice:
        return SafeDevice(await inner.open(ctx))

    sized = wrap_sized(inner, SafeDevice)
    return Recipe(inner.kind, unparse(call), open_, [inner], sized, images=inner.images)


def wrap_sized(inner: Recipe, wrap: Callable[[BlockDevice], BlockDevice]) -> SizedOpener | None:
    """``open_sized`` for a wrapper: the inner device opened with the size, then wrapped."""
    inner_sized = inner.open_sized
    if inner_sized is None:
        return None

    async def open_sized(ctx: OpenContext, size_bytes: int) -> BlockDevice:
        return wrap(await inner_sized(ctx, size_bytes))

    return open_sized


@dataclass(frozen=True)
class SparseArgs:
    path: str = arg(path_arg)
    size: int | None = arg(sparse_size_arg, None)
    format: str | None = arg(format_arg, None)


@kind("sparse", args=SparseArgs)
def compile_sparse(call: Call, options: Options) -> Recipe:
    """``sparse(PATH, size=SIZE)``: created sparse if missing; no size: the file's length."""
    check_not_cut(call)
    args = bind(call, SparseArgs, options)
    path, size, format = args.path, args.size, args.format
    size_later = options.size_from_peer and size is None and not os.path.exists(path)
    if os.path.exists(path):
        check_image_format(path, format)
    try:
        check_backing(path, 0 if size_later else size)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    read_only = options.read_only
    if os.path.exists(path):
        check_file_access(path, read_only, format, empty_ok=size is not None)

    async def open_(ctx: OpenContext) -> BlockDevice:
        return open_sparse(path, size_bytes=size, ctx=ctx, format=format, read_only=read_only)

    async def open_sized(ctx: OpenContext, size_bytes: int) -> BlockDevice:
        size_now = size if size is not None else new_only(size_bytes)
        return open_sparse(path, size_bytes=size_now, ctx=ctx, format=format)

    def new_only(size_bytes: int) -> int | None:
        """The peer's size is for a new file: an existing one keeps its own length."""
        return None if os.path.exists(path) else size_bytes

    return Recipe("sparse", unparse(call), open_, open_sized=open_sized, images=(path,))


@dataclass(frozen=True)
class MirrorArgs:
    primary: Recipe = arg(device_arg)
    secondary: Recipe = arg(secondary_arg)
    state: str | None = arg(state_path, None)
    chunk: int = arg(size_arg, DEFAULT_CHUNK)
    rate: int | None = arg(optional_size, None)
    verify: str = arg(verify_arg, "sample")


@kind("mirror", args=MirrorArgs)
def compile_mirror(call: Call, options: Options) -> Recipe:
    """``mirror(PRIMARY, SECONDARY, state=PATH, chunk=SIZE, rate=BYTES_PER_S, verify=full)``: the
    copier starts in the context's nursery once every device is open; closing the
    device stops it."""
    args = bind(call, MirrorArgs, options)
    try:
        check_options(args.chunk, args.rate)
    except MirrorRefused as exc:
        raise SpecError(str(exc)) from None
    same_text = args.primary.text == args.secondary.text and args.primary.kind != "memory"
    if same_text or shared_image(args.primary, args.secondary):
        raise SpecError("the secondary is the primary itself; mirror onto another device")
    if args.state is not None and args.secondary.kind == "memory":
        raise SpecError(
            "a mem() secondary forgets its data at unmount, so state= could never resume "
            "it: leave out state=, or mirror onto a file"
        )

    async def open_(ctx: OpenContext) -> BlockDevice:
        async with AsyncExitStack() as undo:  # closes what opened if a later step fails
            primary = await args.primary.open(ctx)
            undo.push_async_callback(primary.aclose)
            secondary = await open_secondary(args.secondary, primary, ctx)
            undo.push_async_callback(secondary.aclose)
            mirror = await prepare_mirror(
                primary, secondary, state=args.state, chunk=args.chunk, rate=args.rate,
                verify=args.verify, ctx=ctx,
            )  # fmt: skip
            undo.pop_all()
        ctx.start_when_all_open(lambda: ctx.nursery.start(mirror.run_copier))
        return mirror

    images = args.primary.images + args.secondary.images
    return Recipe("mirror", unparse(call), open_, [args.primary, args.secondary], images=images)


def shared_image(a: Recipe, b: Recipe) -> bool:
    """Whether ``a`` and ``b`` would open one image (the same file by any name)."""
    return any(same_file(x, y) for x in a.images for y in b.images)


def same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


async def open_secondary(recipe: Recipe, primary: BlockDevice, ctx: OpenContext) -> BlockDevice:
    """The secondary, opened with the primary's size where its kind takes one."""
    if recipe.open_sized is None:
        return await recipe.open(ctx)
    return await recipe.open_sized(ctx, (await primary.get_info()).size_bytes)


_URI = re.compile(r"nbd[a-z+]*://")
_ANY_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def compile_remote(text: str, timeout: float = DEFAULT_TIMEOUT) -> Recipe:
    """An NBD URI: checked now (syntax, that a Unix socket exists, that TLS certificates
    load), connected on open."""
    try:
        address = parse_uri(text)
    except BadURI as exc:
        raise SpecError(str(exc)) from None
    if address.socket is not None:
        try:
            is_socket = stat.S_ISSOCK(os.stat(address.socket).st_mode)
        except OSError:
            is_socket = False
        if not is_socket:
            raise SpecError(f"no NBD server socket at {address.socket}")
    if address.tls is not None:
        try:
            client_context(address.tls)
        except TLSFailed as exc:
            raise SpecError(str(exc)) from None

    async def open_(ctx: OpenContext) -> BlockDevice:
        return await open_remote(ctx.nursery, address, request_timeout=timeout)

    return Recipe("nbd", text, open_)


@dataclass(frozen=True)
class NBDArgs:
    uri: str = arg(uri_arg)
    timeout: float = arg(timeout_arg, DEFAULT_TIMEOUT)


@kind("nbd", args=NBDArgs)
def compile_nbd(call: Call, options: Options) -> Recipe:
    """``nbd(URI, timeout=SECONDS)``: ``timeout`` bounds every request (default 30)."""
    args = bind(call, NBDArgs, options)
    recipe = compile_remote(args.uri, args.timeout)
    if args.timeout != DEFAULT_TIMEOUT:
        recipe.text = unparse(call)
    return recipe


def compile_word(node: Word, options: Options) -> Recipe:
    """A bare word: an NBD URI, or a path to a raw image or block device."""
    if _URI.match(node.text) or (_ANY_URI.match(node.text) and not os.path.exists(node.text)):
        return compile_remote(node.text)  # refuses other schemes: "unsupported URI scheme"
    path = existing_path(node, options)
    check_file_access(path, options.read_only)
    return file_recipe(path, options.read_only, unparse(node))


def compile_node(node: Node, options: Options) -> Recipe:
    if isinstance(node, Word):
        return compile_word(node, options)
    compiler = KINDS.get(node.kind)
    if compiler is None:
        known = ", ".join(sorted(KINDS))
        raise SpecError(f"unknown device kind '{node.kind}' (known kinds: {known})")
    return compiler(node, options)


def compile_spec(text: str, options: Options | None = None) -> Recipe:
    """Parse and check ``text``; raises ``SpecError`` with the spec named in the message."""
    try:
        return compile_node(parse(text), options or Options())
    except SpecError as exc:
        raise SpecError(f"bad device spec {text!r}: {exc}") from None


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def split_named(text: str, option: str = "--device") -> tuple[str, str]:
    """``'disk=./a.img'`` -> ``('disk', './a.img')``; the name becomes a file name."""
    name, sep, spec = text.partition("=")
    if not sep or not spec.strip():
        raise SpecError(f"bad {option} {text!r}: expected NAME=SPEC, e.g. disk=./disk.img")
    if not _NAME.fullmatch(name):
        raise SpecError(
            f"bad {option} {text!r}: the name {name!r} must be a file name "
            "(ASCII letters and digits, then also '.', '_', '-'; at most 255)"
        )
    return name, spec.strip()
