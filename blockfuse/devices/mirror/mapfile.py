"""The copy map's file: where it is saved (a ``MapStore``), and what a saved map says.

The format (version 2), one line each::

    blockfuse-mirror-map 2
    size=BYTES sector=BYTES secondary=DEV:INO
    copied A-B C-D ...          (durable: copied and flushed on both sides when saved)
    dirty A-B ...               (chunks where the sides may differ)
    open session=HEX | closed session=HEX primary=SIG secondary=SIG | pivoted

``SIG`` is ``SIZE:MTIME_NS:CTIME_NS`` of a side's regular file (``-`` for anything else).
A map made to vouch for nothing has its version byte overwritten in place with ``0``
(``FileStore.invalidate``); version 1 files (four lines, no session) load as open.
Saves are atomic: write a temporary file, fsync, rename, fsync the directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import trio

from ...extents import IntervalSet

MAGIC = "blockfuse-mirror-map 2"
VERSION_OFFSET = len(MAGIC) - 1
"""The byte that says the version; ``invalidate`` overwrites it with ``0`` in place."""
INVALID_MAGIC = MAGIC[:VERSION_OFFSET] + "0"
OLD_MAGIC = "blockfuse-mirror-map 1"
PIVOTED = "pivoted"
STALE_MARK = "user.blockfuse.stale-map"
"""The xattr on the secondary's file that says which map session may not be trusted."""


class CopyMapError(ValueError):
    """The state file cannot be used with this mirror; the message says why."""


class MapStore(Protocol):
    """Where a map is saved: atomically and durably, or not at all."""

    name: str
    """For messages (the file's path)."""

    def load(self) -> str | None:
        """The saved text, or ``None`` if nothing was saved; raises ``OSError``."""

    async def save(self, text: str) -> None:
        """Replace the saved text, durably and atomically; raises ``OSError``."""

    async def invalidate(self) -> None:
        """Make what was saved vouch for nothing, durably; raises ``OSError``."""


class FileStore:
    """A map file: saved by write, fsync, rename, fsync of the directory."""

    def __init__(self, path: str) -> None:
        self.name = path

    def load(self) -> str | None:
        try:
            with open(self.name) as f:
                return f.read()
        except FileNotFoundError:
            return None

    async def save(self, text: str) -> None:
        await trio.to_thread.run_sync(_write_atomically, self.name, text)

    async def invalidate(self) -> None:
        await trio.to_thread.run_sync(_invalidate_file, self.name)


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_directory(path)


def _invalidate_file(path: str) -> None:
    """Overwrite the version byte in place (needs no new space), else remove the file."""
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, INVALID_MAGIC[VERSION_OFFSET:].encode(), VERSION_OFFSET)
            os.fsync(fd)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return
    except OSError:
        os.unlink(path)
        _sync_directory(path)


def _sync_directory(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class SavedMap:
    """What a map file says, as saved (``parse_map``)."""

    geometry: str
    """``size=BYTES sector=BYTES``."""
    secondary: str
    """What identifies the secondary's file (``DEV:INO``), or ``""``."""
    copied: IntervalSet
    """``durable``: copied, and flushed on both sides, when it was saved."""
    dirty: IntervalSet
    """Chunks where the two sides may differ (whatever ``copied`` says)."""
    pivoted: bool = False
    session: str = ""
    closed: tuple[str, str] | None = None
    """``(primary, secondary)`` file signatures of a clean close; ``None`` if open."""
    invalidated: bool = False

    def vouched(self) -> IntervalSet:
        """The sectors the file says are equal on both sides: ``copied - dirty``."""
        out = self.copied.copy()
        for a, b in self.dirty:
            out.discard(a, b)
        return out


def read_saved_map(path: str) -> SavedMap:
    """The map file at ``path``; raises ``CopyMapError`` if it is not one or is damaged."""
    text = FileStore(path).load()
    if text is None:
        raise CopyMapError(f"{path} does not exist")
    return parse_map(text, path)


def parse_map(text: str, name: str) -> SavedMap:
    lines = text.splitlines()
    if lines[:1] == [INVALID_MAGIC]:
        return SavedMap("", "", IntervalSet(), IntervalSet(), invalidated=True)
    if lines[:1] == [OLD_MAGIC] and len(lines) in (4, 5) and lines[4:] in ([], [PIVOTED]):
        lines = [MAGIC, *lines[1:4], lines[4] if lines[4:] else "open"]
    if len(lines) != 5 or lines[0] != MAGIC:
        raise CopyMapError(f"{name} is not a blockfuse mirror map")
    geometry, _, secondary = lines[1].partition(" secondary=")
    copied, dirty = (_parse_intervals(name, line) for line in lines[2:4])
    words = dict(w.partition("=")[::2] for w in lines[4].split()[1:])
    kind = lines[4].split()[0] if lines[4].split() else ""
    if kind not in ("open", "closed", PIVOTED):
        raise CopyMapError(f"{name} is damaged ({lines[4][:40]!r}...)")
    closed = (words.get("primary", "-"), words.get("secondary", "-")) if kind == "closed" else None
    return SavedMap(
        geometry, secondary, copied, dirty, kind == PIVOTED, words.get("session", ""), closed
    )


def render_map(header: str, durable: IntervalSet, dirty: IntervalSet, ending: str) -> str:
    """The text of a map file (see the module text)."""
    lines = [
        MAGIC,
        header,
        "copied " + _format_intervals(durable),
        "dirty " + _format_intervals(dirty),
    ]
    return "\n".join([*lines, ending, ""])


def _format_intervals(s: IntervalSet) -> str:
    return " ".join(f"{a}-{b}" for a, b in s)


def _parse_intervals(name: str, line: str) -> IntervalSet:
    _, _, rest = line.partition(" ")
    out = IntervalSet()
    try:
        for item in rest.split():
            a, b = item.split("-")
            out.add(int(a), int(b))
    except ValueError:
        raise CopyMapError(f"{name} is damaged ({line[:40]!r}...)") from None
    return out
