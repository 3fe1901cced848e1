"""Device specs: the strings after ``--device NAME=`` turned into opened devices.

Grammar (calls nest; arguments are positional or ``key=value``)::

    spec  := call | word
    call  := KIND "(" [arg ("," arg)*] ")"
    arg   := [KEY "="] spec
    word  := quoted string | bare text up to the next "," or ")" outside quotes

A bare word is a path (a raw image file or block device) or an NBD URI
(``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``).  Examples::

    ./disk.img    file(./disk.img, ro=true)    mem(256M)    safe(mem(1G))
    file("/images/odd,name(1).img")    nbd://10.0.0.5/disk0    safe(nbd+unix:///?socket=/s)
    sparse(./big.img, size=1T)

Opening is two steps so that bad input changes nothing: ``compile_spec`` parses and
checks every argument (kinds, sizes, that files exist) and returns a ``Recipe``; only
then does ``Recipe.open`` create or open anything.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from .background import background_nursery, start_when_all_open
from .block import BlockDevice
from .devices.file import open_file
from .devices.memory import MemoryDevice
from .devices.mirror import DEFAULT_CHUNK, MAX_CHUNK, prepare_mirror, too_big_chunk
from .devices.remote import DEFAULT_TIMEOUT, MAX_TIMEOUT, open_remote
from .devices.safe import SafeDevice
from .devices.sparse import check_backing, open_sparse
from .nbd.uri import BadURI, parse_uri


class SpecError(ValueError):
    """A spec that cannot be used; the message says what is wrong with it."""


# --- syntax ------------------------------------------------------------------------


@dataclass(frozen=True)
class Word:
    text: str
    quoted: bool = False


@dataclass(frozen=True)
class Call:
    kind: str
    args: tuple[Node, ...] = ()
    kwargs: tuple[tuple[str, Node], ...] = ()


Node = Word | Call

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, problem: str) -> SpecError:
        return SpecError(f"{problem} at character {self.pos + 1}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_spaces(self) -> None:
        while self.peek().isspace():
            self.pos += 1

    def parse_spec(self) -> Node:
        self.skip_spaces()
        if self.peek() in ("'", '"'):
            return Word(self.parse_quoted(), quoted=True)
        m = _IDENT.match(self.text, self.pos)
        if m and self.text[m.end() : m.end() + 1] == "(":
            self.pos = m.end() + 1
            return self.parse_call(m.group())
        return self.parse_bare()

    def parse_quoted(self) -> str:
        quote, start = self.peek(), self.pos
        self.pos += 1
        out = []
        while (c := self.peek()) != quote:
            if not c:
                self.pos = start
                raise self.fail("unterminated quoted string")
            if c == "\\":
                self.pos += 1
                c = self.peek()
            out.append(c)
            self.pos += 1
        self.pos += 1
        return "".join(out)

    def parse_bare(self) -> Word:
        start = self.pos
        while self.peek() and self.peek() not in ",()":
            self.pos += 1
        text = self.text[start : self.pos].strip()
        if not text:
            raise self.fail("expected a device spec")
        return Word(text)

    def parse_call(self, kind: str) -> Call:
        args: list[Node] = []
        kwargs: list[tuple[str, Node]] = []
        self.skip_spaces()
        if self.peek() == ")":
            self.pos += 1
            return Call(kind)
        while True:
            self.parse_arg(kind, args, kwargs)
            self.skip_spaces()
            c = self.peek()
            self.pos += 1
            if c == ")":
                return Call(kind, tuple(args), tuple(kwargs))
            if c != ",":
                self.pos -= 1
                raise self.fail(f"expected ',' or ')' in {kind}(...)")

    def parse_arg(self, kind: str, args: list[Node], kwargs: list[tuple[str, Node]]) -> None:
        self.skip_spaces()
        m = _IDENT.match(self.text, self.pos)
        if m and self.text[m.end() : m.end() + 1] == "=":
            self.pos = m.end() + 1
            if any(k == m.group() for k, _ in kwargs):
                raise self.fail(f"{kind}(...) names '{m.group()}' twice")
            kwargs.append((m.group(), self.parse_spec()))
            return
        if kwargs:
            raise self.fail(f"positional argument after key=value in {kind}(...)")
        args.append(self.parse_spec())


def parse(text: str) -> Node:
    """Parse a spec into its syntax tree; raises ``SpecError``."""
    p = _Parser(text)
    node = p.parse_spec()
    p.skip_spaces()
    if p.pos != len(text):
        raise p.fail(f"unexpected {text[p.pos]!r}")
    return node


# --- values ------------------------------------------------------------------------

_SIZE = re.compile(r"(\d+)\s*([KMGTP]?)(i?B)?", re.IGNORECASE)
_SHIFTS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}


def parse_size(text: str) -> int:
    """``'512'`` -> 512, ``'64K'`` -> 65536, ``'1G'``/``'1GiB'`` -> 2**30 (binary units)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise SpecError(f"bad size {text!r} (use a number with an optional K, M, G, T or P)")
    return int(m.group(1)) << _SHIFTS[m.group(2).upper()]


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise SpecError(f"bad boolean {text!r} (use true or false)")


# --- recipes -----------------------------------------------------------------------

Opener = Callable[[], Awaitable[BlockDevice]]
SizedOpener = Callable[[int], Awaitable[BlockDevice]]


@dataclass
class Recipe:
    """A checked spec, ready to open.  ``kind`` is the outermost kind the user wrote.

    ``open_sized(size_bytes)``, where a kind offers it (``sparse``), opens the device with
    a size another device dictates: a mirror opens its primary, then its secondary with
    the primary's size.  Compile such a secondary inside ``size_from_peer()`` so that a
    missing file without ``size=`` is not an error.
    """

    kind: str
    text: str
    open: Opener
    children: list[Recipe] = field(default_factory=list)
    open_sized: SizedOpener | None = None


_size_from_peer: ContextVar[bool] = ContextVar("size_from_peer", default=False)


@contextmanager
def size_from_peer() -> Iterator[None]:
    """Compile specs whose size will come from another device (``Recipe.open_sized``)."""
    token = _size_from_peer.set(True)
    try:
        yield
    finally:
        _size_from_peer.reset(token)


@dataclass(frozen=True)
class Param:
    name: str
    convert: Callable[[Node], object]
    default: object = None
    required: bool = True


def word(node: Node, what: str) -> str:
    if not isinstance(node, Word):
        raise SpecError(f"{what} must be a plain value, not {node.kind}(...)")
    return node.text


def existing_path(node: Node) -> str:
    path = word(node, "a path")
    if not os.path.exists(path):
        raise SpecError(f"no such file: {path}")
    return path


def size_arg(node: Node) -> int:
    return parse_size(word(node, "a size"))


def sparse_size_arg(node: Node) -> int:
    text = word(node, "a size")
    if text.strip().startswith("-"):
        raise SpecError(f"bad size {text!r}: a size cannot be negative")
    size = parse_size(text)
    if size == 0:
        raise SpecError(f"bad size {text!r}: a sparse image needs a size above 0")
    return size


def bool_arg(node: Node) -> bool:
    return parse_bool(word(node, "a boolean"))


def device_arg(node: Node) -> Recipe:
    return compile_node(node)


def bind(call: Call, params: list[Param]) -> dict[str, object]:
    """Match a call's arguments to ``params`` and convert each; raises ``SpecError``."""
    if len(call.args) > len(params):
        most = f"{len(params)} argument{'' if len(params) == 1 else 's'}"
        raise SpecError(f"{call.kind}(...) takes at most {most}")
    given: dict[str, Node] = {p.name: a for p, a in zip(params, call.args, strict=False)}
    names = {p.name for p in params}
    for key, node in call.kwargs:
        if key not in names:
            raise SpecError(
                f"{call.kind}(...) has no argument '{key}' (it takes: {', '.join(sorted(names))})"
            )
        if key in given:
            raise SpecError(f"{call.kind}(...) got '{key}' twice")
        given[key] = node
    values: dict[str, object] = {}
    for p in params:
        if p.name in given:
            values[p.name] = p.convert(given[p.name])
        elif p.required:
            raise SpecError(f"{call.kind}(...) needs '{p.name}'")
        else:
            values[p.name] = p.default
    return values


def unparse(node: Node) -> str:
    if isinstance(node, Word):
        return repr(node.text) if node.quoted else node.text
    parts = [unparse(a) for a in node.args] + [f"{k}={unparse(v)}" for k, v in node.kwargs]
    return f"{node.kind}({', '.join(parts)})"


# --- kinds -------------------------------------------------------------------------

KindCompiler = Callable[[Call], Recipe]
KINDS: dict[str, KindCompiler] = {}


def kind(*names: str) -> Callable[[KindCompiler], KindCompiler]:
    def register(fn: KindCompiler) -> KindCompiler:
        for name in names:
            KINDS[name] = fn
        return fn

    return register


def file_recipe(path: str, read_only: bool, text: str) -> Recipe:
    async def open_() -> BlockDevice:
        return open_file(path, read_only=read_only)

    return Recipe("file", text, open_)


@kind("file")
def compile_file(call: Call) -> Recipe:
    v = bind(call, [Param("path", existing_path), Param("ro", bool_arg, False, False)])
    path, ro = str(v["path"]), bool(v["ro"])
    check_file_access(path, ro)
    return file_recipe(path, ro, unparse(call))


def check_file_access(path: str, read_only: bool) -> None:
    """What opening ``path`` as a raw image would find wrong, found without opening it."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise SpecError(f"{path} is a directory, not an image file or block device")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise SpecError(f"{path} is not a regular file or block device")
    if stat.S_ISREG(st.st_mode) and st.st_size % 512:
        raise SpecError(
            f"{path} is {st.st_size} bytes, not a whole number of 512-byte sectors "
            f"(use sparse({path}, size=...) or `truncate -s` it to a multiple of 512)"
        )
    if not os.access(path, os.R_OK if read_only else os.R_OK | os.W_OK):
        mode = "reading" if read_only else "reading and writing"
        raise SpecError(f"{path} cannot be opened for {mode} (permission denied)")


@kind("mem", "memory")
def compile_memory(call: Call) -> Recipe:
    size = int(bind(call, [Param("size", size_arg)])["size"])  # type: ignore[call-overload]
    if size == 0:
        raise SpecError("a memory device needs a size above 0 (e.g. mem(256M))")
    if size % 512:
        raise SpecError(f"memory size {size} is not a whole number of 512-byte sectors")

    async def open_() -> BlockDevice:
        return MemoryDevice(size)

    return Recipe("memory", unparse(call), open_)


@kind("safe")
def compile_safe(call: Call) -> Recipe:
    inner = bind(call, [Param("device", device_arg)])["device"]
    assert isinstance(inner, Recipe)

    async def open_() -> BlockDevice:
        return SafeDevice(await inner.open())

    return Recipe(inner.kind, unparse(call), open_, [inner], wrap_sized(inner, SafeDevice))


def wrap_sized(inner: Recipe, wrap: Callable[[BlockDevice], BlockDevice]) -> SizedOpener | None:
    """``open_sized`` for a wrapper: the inner device opened with the size, then wrapped."""
    inner_sized = inner.open_sized
    if inner_sized is None:
        return None

    async def open_sized(size_bytes: int) -> BlockDevice:
        return wrap(await inner_sized(size_bytes))

    return open_sized


@kind("sparse")
def compile_sparse(call: Call) -> Recipe:
    """``sparse(PATH, size=SIZE)``: created sparse if missing; no size: the file's length."""
    v = bind(call, [Param("path", path_arg), Param("size", sparse_size_arg, None, False)])
    path = str(v["path"])
    size = v["size"] if isinstance(v["size"], int) else None
    size_later = _size_from_peer.get() and size is None and not os.path.exists(path)
    try:
        check_backing(path, 0 if size_later else size)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    if os.path.exists(path):
        check_file_access(path, False)

    async def open_() -> BlockDevice:
        return open_sparse(path, size_bytes=size)

    async def open_sized(size_bytes: int) -> BlockDevice:
        return open_sparse(path, size_bytes=size if size is not None else new_only(size_bytes))

    def new_only(size_bytes: int) -> int | None:
        """The peer's size is for a new file: an existing one keeps its own length."""
        return None if os.path.exists(path) else size_bytes

    return Recipe("sparse", unparse(call), open_, open_sized=open_sized)


def path_arg(node: Node) -> str:
    return word(node, "a path")


def state_path(node: Node) -> str:
    """A file to keep state in: it may not exist yet, but its directory must."""
    path = word(node, "a state file")
    if os.path.isdir(path):
        raise SpecError(f"state file {path} is a directory")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise SpecError(f"the directory of state file {path} does not exist")
    return path


@kind("mirror")
def compile_mirror(call: Call) -> Recipe:
    """``mirror(PRIMARY, SECONDARY, state=PATH, chunk=SIZE, rate=BYTES_PER_S)``: the
    copier runs in ``background_nursery()``; closing the device stops it."""
    v = bind(
        call,
        [
            Param("primary", device_arg),
            Param("secondary", secondary_arg),
            Param("state", state_path, None, False),
            Param("chunk", size_arg, DEFAULT_CHUNK, False),
            Param("rate", size_arg, None, False),
        ],
    )
    primary, secondary = v["primary"], v["secondary"]
    assert isinstance(primary, Recipe) and isinstance(secondary, Recipe)
    chunk, rate = v["chunk"], v["rate"]
    assert isinstance(chunk, int) and (rate is None or isinstance(rate, int))
    if chunk == 0:
        raise SpecError("a mirror chunk must be more than 0 bytes (or left out: 4M)")
    if chunk % 512:
        raise SpecError(f"mirror chunk {chunk} is not a whole number of 512-byte sectors")
    if chunk > MAX_CHUNK:
        raise SpecError(too_big_chunk(chunk))
    if rate == 0:
        raise SpecError("mirror rate must be more than 0 bytes per second (or left out)")
    if primary.text == secondary.text and primary.kind != "memory":
        raise SpecError("the secondary is the primary itself; mirror onto another device")
    state = v["state"]
    assert state is None or isinstance(state, str)

    async def open_() -> BlockDevice:
        p = await primary.open()
        try:
            s = await open_secondary(secondary, p)
        except BaseException:
            await p.aclose()
            raise
        try:
            mirror = await prepare_mirror(p, s, state=state, chunk=chunk, rate=rate)
        except BaseException:
            await p.aclose()
            await s.aclose()
            raise
        nursery = background_nursery()
        await start_when_all_open(lambda: nursery.start(mirror.run_copier))
        return mirror

    return Recipe("mirror", unparse(call), open_, [primary, secondary])


def secondary_arg(node: Node) -> Recipe:
    """A mirror's secondary: a new ``sparse(PATH)`` may leave its size to the primary."""
    with size_from_peer():
        return compile_node(node)


async def open_secondary(recipe: Recipe, primary: BlockDevice) -> BlockDevice:
    """The secondary, opened with the primary's size where its kind takes one."""
    if recipe.open_sized is None:
        return await recipe.open()
    return await recipe.open_sized((await primary.get_info()).size_bytes)


_URI = re.compile(r"nbd[a-z+]*://")


def compile_remote(text: str, timeout: float = DEFAULT_TIMEOUT) -> Recipe:
    """An NBD URI: checked now (syntax, that a Unix socket exists), connected on open."""
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

    async def open_() -> BlockDevice:
        return await open_remote(background_nursery(), address, request_timeout=timeout)

    return Recipe("nbd", text, open_)


@kind("nbd")
def compile_nbd(call: Call) -> Recipe:
    """``nbd(URI, timeout=SECONDS)``: ``timeout`` bounds every request (default 30)."""
    v = bind(
        call,
        [
            Param("uri", lambda node: word(node, "an NBD URI")),
            Param("timeout", timeout_arg, DEFAULT_TIMEOUT, False),
        ],
    )
    timeout = v["timeout"]
    assert isinstance(timeout, float)
    recipe = compile_remote(str(v["uri"]), timeout)
    if timeout != DEFAULT_TIMEOUT:
        recipe.text = unparse(call)
    return recipe


def timeout_arg(node: Node) -> float:
    text = word(node, "a number of seconds")
    try:
        seconds = float(text)
    except ValueError:
        raise SpecError(f"bad timeout {text!r} (use seconds, e.g. timeout=10)") from None
    if not 0 < seconds <= MAX_TIMEOUT:
        raise SpecError(f"bad timeout {text!r}: use more than 0 and at most {MAX_TIMEOUT:g} s")
    return seconds


def compile_word(node: Word) -> Recipe:
    """A bare word: an NBD URI, or a path to a raw image or block device."""
    if _URI.match(node.text):
        return compile_remote(node.text)
    path = existing_path(node)
    check_file_access(path, False)
    return file_recipe(path, False, unparse(node))


def compile_node(node: Node) -> Recipe:
    if isinstance(node, Word):
        return compile_word(node)
    compiler = KINDS.get(node.kind)
    if compiler is None:
        known = ", ".join(sorted(KINDS))
        raise SpecError(f"unknown device kind '{node.kind}' (known kinds: {known})")
    return compiler(node)


def compile_spec(text: str) -> Recipe:
    """Parse and check ``text``; raises ``SpecError`` with the spec named in the message."""
    try:
        return compile_node(parse(text))
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
