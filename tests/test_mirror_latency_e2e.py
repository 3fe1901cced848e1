"""Foreground writes through the mount during a copy from nbdkit's rate filter at
30 Mbit/s (issue 12, defect 6: single writes took up to 20 s with 3 writers)."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from .conftest import require_tool
from .mounting import mounted
from .nbdpeers import Peer
from .timing import time_limit

SIZE = 64 << 20
limit = time_limit(120)
pytestmark = pytest.mark.e2e


def test_foreground_writes_during_a_throttled_copy_wait_little(short_tmp: Path) -> None:
    exe = require_tool("nbdkit", "nbdkit")
    primary = short_tmp / "p.img"
    primary.write_bytes(os.urandom(SIZE))
    peer = Peer(
        [exe, "-f", "-U", "{sock}", "--filter=rate", "file", str(primary), "rate=30M"],
        short_tmp,
    )
    waits: list[float] = []
    try:
        spec = f"disk=mirror({peer.uri()}, sparse({short_tmp}/s.img))"
        with mounted(short_tmp / "mnt", [spec]) as m:
            fd = os.open(m.path("disk"), os.O_RDWR | os.O_DIRECT)
            try:
                deadline = time.monotonic() + 10

                def writer(seed: int) -> None:
                    rng, buf = random.Random(seed), memoryview(bytearray(os.urandom(4096)))
                    while time.monotonic() < deadline:
                        offset = rng.randrange(0, SIZE // 4096) * 4096
                        started = time.monotonic()
                        os.pwrite(fd, buf, offset)
                        waits.append(time.monotonic() - started)
                        time.sleep(0.05)

                threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            finally:
                os.close(fd)
            copied = int(os.getxattr(m.path("disk"), "user.blockfuse.copied"))
    finally:
        peer.stop()
    waits.sort()
    p99 = waits[int(len(waits) * 0.99)]
    summary = f"p99 {p99:.2f} s, worst {waits[-1]:.2f} s of {len(waits)} writes; {copied} copied"
    assert len(waits) > 50 and p99 < 1.5, summary
    assert copied > 0, summary
