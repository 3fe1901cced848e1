#!/usr/bin/env python3
"""Per-call cost of file I/O from trio: in the event loop vs in a worker thread.

The evidence behind ``blockfuse/devices/file.py``: a ``preadv``/``pwritev`` served from
the page cache costs microseconds in the loop, while ``trio.to_thread.run_sync`` adds a
hand-off of tens of microseconds.  So the file device tries ``RWF_NOWAIT`` in the loop
first and sends only what would block to a thread.

    .venv/bin/python scripts/bench_file_calls.py [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import trio

from blockfuse.devices.file import open_file

CALLS = 2000


def in_loop(fd: int, buf: bytearray, size: int, write: bool) -> float:
    start = time.perf_counter()
    for i in range(CALLS):
        offset = (i * len(buf)) % size
        if write:
            os.pwritev(fd, [buf], offset)
        else:
            os.preadv(fd, [buf], offset)
    return (time.perf_counter() - start) / CALLS


async def in_thread(fd: int, buf: bytearray, size: int, write: bool) -> float:
    call = os.pwritev if write else os.preadv
    start = time.perf_counter()
    for i in range(CALLS):
        offset = (i * len(buf)) % size
        await trio.to_thread.run_sync(call, fd, [buf], offset)
    return (time.perf_counter() - start) / CALLS


async def via_device(path: str, buf: bytearray, size: int, write: bool) -> float:
    dev = open_file(path)
    start = time.perf_counter()
    for i in range(CALLS):
        sector = ((i * len(buf)) % size) // 512
        await (dev.write(sector, [buf]) if write else dev.read(sector, [buf]))
    elapsed = (time.perf_counter() - start) / CALLS
    await dev.aclose()
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    size = 64 << 20
    with tempfile.NamedTemporaryFile(dir=args.dir) as f:
        f.write(os.urandom(size))
        f.flush()
        fd = os.open(f.name, os.O_RDWR)
        print(f"{'request':>8} {'op':>5} {'in loop':>10} {'thread':>10} {'device':>10}  (µs/call)")
        for block in (4096, 65536, 1 << 20):
            buf = bytearray(block)
            for write in (False, True):
                loop = in_loop(fd, buf, size, write)
                thread = await in_thread(fd, buf, size, write)
                device = await via_device(f.name, buf, size, write)
                op = "write" if write else "read"
                print(
                    f"{block:>8} {op:>5} {loop * 1e6:>10.1f} {thread * 1e6:>10.1f}"
                    f" {device * 1e6:>10.1f}"
                )
        os.close(fd)


if __name__ == "__main__":
    trio.run(main)
