"""An nbdkit ``sh`` plugin (run by a wrapper script) whose every connection has a write
cache of its own: a connection reads its own unflushed writes, others see them only
after a flush.  Behind ``nbdkit --filter=multi-conn ... multi-conn-mode=emulate`` (a
flush on any connection is replayed on all) it is a server that keeps the NBD spec's
CAN_MULTI_CONN promise and nothing more: "the effects of NBD_CMD_FLUSH and
NBD_CMD_FLAG_FUA MUST be visible across all connections when the server sends its
reply to that command".

    $IMAGE           the shared image
    $tmpdir/c-N/     one directory per connection: cache.img (sparse) and dirty.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

IMAGE = Path(os.environ.get("IMAGE", "/dev/null"))
TMP = Path(os.environ.get("tmpdir", "/tmp"))  # noqa: SIM112 - nbdkit sh names it so


def dirty(handle: str) -> list[list[int]]:
    try:
        return list(json.loads((TMP / handle / "dirty.json").read_text()))
    except FileNotFoundError:
        return []


def pread(handle: str, count: int, offset: int) -> None:
    with open(IMAGE, "rb") as f:
        f.seek(offset)
        buf = bytearray(f.read(count))
    with open(TMP / handle / "cache.img", "rb") as cache:
        for a, b in dirty(handle):
            lo, hi = max(a, offset), min(b, offset + count)
            if lo < hi:
                cache.seek(lo)
                buf[lo - offset : hi - offset] = cache.read(hi - lo)
    sys.stdout.buffer.write(buf)


def pwrite(handle: str, count: int, offset: int) -> None:
    data = sys.stdin.buffer.read(count)
    with open(TMP / handle / "cache.img", "r+b") as cache:
        cache.seek(offset)
        cache.write(data)
    ranges = [*dirty(handle), [offset, offset + count]]
    (TMP / handle / "dirty.json").write_text(json.dumps(ranges))


def flush(handle: str) -> None:
    with open(TMP / handle / "cache.img", "rb") as cache, open(IMAGE, "r+b") as image:
        for a, b in dirty(handle):
            cache.seek(a)
            image.seek(a)
            image.write(cache.read(b - a))
    (TMP / handle / "dirty.json").write_text("[]")


def main(method: str, args: list[str]) -> int:
    if method == "thread_model":
        print("serialize_all_requests")
    elif method == "open":
        handle = f"c-{sum(1 for p in TMP.iterdir() if p.name.startswith('c-'))}"
        (TMP / handle).mkdir()
        (TMP / handle / "cache.img").touch()
        print(handle)
    elif method == "get_size":
        print(IMAGE.stat().st_size)
    elif method == "can_fua":
        print("emulate")
    elif method in ("can_write", "can_flush"):
        return 0
    elif method == "pread":
        pread(args[0], int(args[1]), int(args[2]))
    elif method == "pwrite":
        pwrite(args[0], int(args[1]), int(args[2]))
    elif method == "flush":
        flush(args[0])
    elif method == "close":
        pass  # a closed connection's unflushed writes are gone, as a volatile cache's
    else:
        return 2  # not implemented: nbdkit's defaults (no multi-conn of its own, ...)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
