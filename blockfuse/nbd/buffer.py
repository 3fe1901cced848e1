"""A receive buffer that hands out headers whole and payloads piece by piece.

Bytes fed in are kept as the chunks they arrived in.  ``take(n)`` joins exactly ``n``
bytes (used for fixed-size headers, so small); ``take_some(n)`` returns a zero-copy view
of at most ``n`` bytes (used to stream payloads into the caller's buffer).  The buffer
never holds more than what was fed and not yet taken: the peer decides nothing here.
"""

from __future__ import annotations

from collections import deque


class ReceiveBuffer:
    def __init__(self) -> None:
        self._chunks: deque[memoryview] = deque()
        self.size = 0
        """Bytes buffered (``len``), as an attribute for the hot paths."""

    def __len__(self) -> int:
        return self.size

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not isinstance(data, bytes):
            data = bytes(data)
        self._chunks.append(memoryview(data))
        self.size += len(data)

    def take(self, n: int) -> bytes | None:
        """Exactly ``n`` bytes, or ``None`` (nothing consumed) if fewer are buffered."""
        if self.size < n:
            return None
        if n == 0:
            return b""
        head = self._chunks[0]
        if len(head) >= n:
            self._advance_head(n)
            return bytes(head[:n])
        out = bytearray()
        while len(out) < n:
            head = self._chunks[0]
            part = min(len(head), n - len(out))
            out += head[:part]
            self._advance_head(part)
        return bytes(out)

    def peek(self, n: int) -> bytes | None:
        """The first ``n`` bytes without consuming them, or ``None`` if fewer are buffered."""
        if self.size < n:
            return None
        if n == 0:
            return b""
        head = self._chunks[0]
        if len(head) >= n:
            return bytes(head[:n])
        out = bytearray()
        for chunk in self._chunks:
            out += chunk[: n - len(out)]
            if len(out) == n:
                break
        return bytes(out)

    def take_whole(self, n: int) -> memoryview | None:
        """Exactly ``n`` bytes without copying where they lie in one chunk as fed, else
        ``None`` (nothing consumed).  The view keeps that chunk alive."""
        if not self._chunks or len(self._chunks[0]) < n:
            return None
        head = self._chunks[0]
        self._advance_head(n)
        return head[:n]

    def take_some(self, n: int) -> memoryview | None:
        """Up to ``n`` bytes without copying, or ``None`` if the buffer is empty."""
        if not self.size or n <= 0:
            return None
        head = self._chunks[0]
        part = min(len(head), n)
        self._advance_head(part)
        return head[:part]

    def _advance_head(self, n: int) -> None:
        head = self._chunks[0]
        if n == len(head):
            self._chunks.popleft()
        else:
            self._chunks[0] = head[n:]
        self.size -= n
