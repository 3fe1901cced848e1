"""What a client asks in its options, parsed for the server, and the server's answers.

Option data arrives whole (the server core bounds its length first, ``MAX_OPTION_DATA``)
and is parsed here by pure functions.  Data that does not parse raises ``BadOption``
with the reply the server must send (``ERR_INVALID``, ``ERR_TOO_BIG``): the option is
refused and the handshake goes on, in sync, because the core always consumed exactly
the length the header declared.  The layouts, from ``doc/proto.md``::

    INFO / GO:              u32 name_len, name, u16 n, n x u16 info type
    LIST / SET_META_CONTEXT: u32 name_len, name, u32 n, n x (u32 len, query)

Meta contexts: the server knows one, ``base:allocation``.  A LIST query of ``base:`` is
the namespace's wildcard; a SET query of ``base:`` selects nothing; an unknown
``base:leaf`` and every other namespace are ignored (the spec's MUST); a query without
a namespace (no colon) is ``ERR_INVALID``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import (
    BASE_ALLOCATION,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_QUERIES,
    MAX_STRING,
    U16,
    U32,
    InfoType,
    Rep,
)
from .events import ExportInfo


class BadOption(Exception):
    """Option data the server refuses with ``reply`` (and ``str(self)`` as its message)."""

    def __init__(self, reply: Rep, message: str) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class InfoRequest:
    name: str
    wanted: frozenset[int]


@dataclass(frozen=True)
class MetaRequest:
    name: str
    queries: tuple[str, ...]


class Reader:
    """Reads fields off option data; running past its end is ``ERR_INVALID``."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._at = 0
        self._what = what

    def take(self, n: int) -> bytes:
        if self._at + n > len(self._data):
            raise BadOption(Rep.ERR_INVALID, f"{self._what}: data ends inside a field")
        out = self._data[self._at : self._at + n]
        self._at += n
        return out

    def u16(self) -> int:
        (value,) = U16.unpack(self.take(2))
        return int(value)

    def u32(self) -> int:
        (value,) = U32.unpack(self.take(4))
        return int(value)

    def string(self, field: str) -> str:
        n = self.u32()
        if n > MAX_STRING:
            raise BadOption(Rep.ERR_INVALID, f"{self._what}: {field} of {n} bytes (limit 4096)")
        return self.take(n).decode("utf-8", errors="replace")

    def end(self) -> None:
        if self._at != len(self._data):
            raise BadOption(
                Rep.ERR_INVALID, f"{self._what}: {len(self._data) - self._at} bytes too many"
            )


def parse_info_request(data: bytes, what: str) -> InfoRequest:
    """The data of NBD_OPT_INFO / NBD_OPT_GO."""
    r = Reader(data, what)
    name = r.string("export name")
    count = r.u16()
    wanted = frozenset(r.u16() for _ in range(count))
    r.end()
    return InfoRequest(name, wanted)


def parse_meta_request(data: bytes, what: str) -> MetaRequest:
    """The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    r = Reader(data, what)
    name = r.string("export name")
    count = r.u32()
    if count > MAX_QUERIES:
        raise BadOption(Rep.ERR_TOO_BIG, f"{what}: {count} queries (limit {MAX_QUERIES})")
    queries = tuple(r.string("query") for _ in range(count))
    r.end()
    for query in queries:
        if ":" not in query:
            raise BadOption(Rep.ERR_INVALID, f"{what}: query {query[:64]!r} has no namespace")
    return MetaRequest(name, queries)


def listed_contexts(queries: tuple[str, ...]) -> list[str]:
    """The contexts LIST_META_CONTEXT names for ``queries`` (none: everything offered)."""
    if not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries):
        return [BASE_ALLOCATION]
    return []


def selected_contexts(queries: tuple[str, ...]) -> list[str]:
    """The contexts SET_META_CONTEXT selects for ``queries`` (each at most once)."""
    return [BASE_ALLOCATION] if BASE_ALLOCATION in queries else []


def context_reply(context_id: int, name: str) -> bytes:
    return U32.pack(context_id) + name.encode()


def server_entry(export: ExportInfo) -> bytes:
    """An NBD_REP_SERVER payload: the name, then the description."""
    raw = export.name.encode()
    return U32.pack(len(raw)) + raw + export.description.encode()[:MAX_STRING]


def info_items(export: ExportInfo, wanted: frozenset[int]) -> list[bytes]:
    """The NBD_REP_INFO payloads for INFO/GO: the export (always) and the block sizes
    (always: with a minimum of 1 they bind the client to nothing), the name and the
    description when asked.  The same for INFO and a GO that follows it."""
    items = [INFO_EXPORT.pack(InfoType.EXPORT, export.size or 0, export.flags)]
    sizes = (export.min_block, export.preferred_block, export.max_payload)
    items.append(INFO_BLOCK_SIZE.pack(InfoType.BLOCK_SIZE, *sizes))
    if InfoType.NAME in wanted:
        items.append(U16.pack(InfoType.NAME) + export.name.encode())
    if InfoType.DESCRIPTION in wanted:
        items.append(U16.pack(InfoType.DESCRIPTION) + export.description.encode()[:MAX_STRING])
    return items
