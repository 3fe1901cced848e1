#!/usr/bin/env python3
"""NBD over TLS (issue 16): sequential 1 MiB reads, ours vs the reference, with TLS and
without, in one run.

- **client**: our NBD client vs libnbd's Python binding, each reading SIZE bytes in
  1 MiB requests (1 in flight, then ``--depth`` in flight: libnbd's ``aio_pread``) from
  ``nbdkit --tls=require memory SIZE`` (and plain ``nbdkit memory SIZE``);
- **server**: ``blockfuse serve -d disk=IMAGE --tls=require`` vs ``nbdkit --tls=require
  file IMAGE`` (and both without TLS), each read whole by ``nbdcopy --no-extents
  --connections=1 --request-size=1M URI null:``.

Everything (the image of SIZE random bytes, the certificates, the sockets) lives in a
private tmpfs, so no side reads a disk.  Each round runs every case once, ours and the
reference in a rotated order; the table shows the median MB/s, the median of the
per-round ratios (ours / reference) and the median CPU seconds of the process that is
compared (the client, or the server), with the other side's beside it: a server's from
/proc/PID/task/*/schedstat, sampled during the run (``TaskCPU``), a reader's as it
measured it for its reads alone (``time.process_time``, every thread), nbdcopy's from
``wait4`` (it is gone before /proc could be read).  Target: at least 0.7x the
reference with TLS, on each side.

    .venv/bin/python scripts/bench_tls.py [--size 1G] [--rounds 5] [--depth 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import REPO, connectable, need, terminate, tmpfs

MiB = 1 << 20
TARGET = 0.7
SYSTEM_PYTHON = "/usr/bin/python3"

LIBNBD_READER = r"""
import json, os, sys, time
sys.path.append("/usr/lib/python3/dist-packages")
import nbd
uri, size, depth = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
MiB = 1 << 20
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
started, cpu = time.perf_counter(), time.process_time()
if depth == 1:
    for off in range(0, size, MiB):
        h.pread(MiB, off)
else:
    bufs = [nbd.Buffer(MiB) for _ in range(depth)]
    free = list(range(depth))
    def done(i):
        def callback(error):
            free.append(i)
            return 1
        return callback
    off = 0
    while off < size or h.aio_in_flight() > 0:
        while free and off < size:
            i = free.pop()
            h.aio_pread(bufs[i], off, completion=done(i))
            off += MiB
        h.poll(-1)
seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
h.shutdown()
print(json.dumps({"seconds": seconds, "cpu": cpu}))
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="1G", help="bytes read per run (default 1G)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (at least 3); medians count")
    p.add_argument("--depth", type=int, default=8, help="requests in flight in the deep runs")
    p.add_argument("--only", choices=["client", "server"], help="run one side's cases only")
    p.add_argument("--ours-reader", nargs=3, metavar=("URI", "SIZE", "DEPTH"),
                   help=argparse.SUPPRESS)  # fmt: skip
    return p.parse_args()


def size_of(text: str) -> int:
    units = {"K": 10, "M": 20, "G": 30}
    return int(text[:-1]) << units[text[-1].upper()] if text[-1].isalpha() else int(text)


# --- our reader (a child process, so its CPU is its own) -----------------------------------


def ours_reader(uri: str, size: int, depth: int) -> None:
    import trio

    sys.path.insert(0, str(REPO))
    from blockfuse.nbd.uri import parse_uri
    from blockfuse.transport.connect import open_nbd_client

    async def main() -> tuple[float, float]:
        async with open_nbd_client(parse_uri(uri)) as client:
            offsets = iter(range(0, size, MiB))

            async def worker() -> None:
                buf = memoryview(bytearray(MiB))
                for off in offsets:
                    await client.pread(buf, off)

            started, cpu = time.perf_counter(), time.process_time()
            async with trio.open_nursery() as nursery:
                for _ in range(depth):
                    nursery.start_soon(worker)
            return time.perf_counter() - started, time.process_time() - cpu

    seconds, cpu = trio.run(main)
    print(json.dumps({"seconds": seconds, "cpu": cpu}))


# --- processes ------------------------------------------------------------------------------


@dataclass
class Run:
    mbps: float
    cpu: float
    """CPU seconds of the process compared (the reader, or the server)."""
    other_cpu: float
    """CPU seconds of the other side (the server, or nbdcopy)."""


class Server:
    """A server process on a Unix socket, up until ``stop``."""

    def __init__(self, argv: list[str], sock: Path, log: Path) -> None:
        sock.unlink(missing_ok=True)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + 30
        while not connectable(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"{argv[0]} did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.02)

    def stop(self) -> None:
        terminate(self.proc, 60)


class TaskCPU:
    """The CPU time a process spends from ``start`` to ``stop``, threads that end in
    between included: /proc/PID/task/*/schedstat sampled every few ms from a thread, each
    task's highest figure kept (``benchlib.cpu_ns`` alone would lose the time of nbdkit's
    per-connection threads, which end with their connection)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: dict[str, int] = {}
        self._before = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _take(self) -> None:
        for stat in Path(f"/proc/{self.pid}/task").glob("*/schedstat"):
            try:
                ns = int(stat.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            tid = stat.parent.name
            self.seen[tid] = max(ns, self.seen.get(tid, 0))

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self._take()

    def start(self) -> None:
        self._take()
        self._before = sum(self.seen.values())
        self._thread.start()

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        self._take()
        return (sum(self.seen.values()) - self._before) / 1e9


def measured(argv: list[str], size: int, server: Server) -> Run:
    """Run a reader to its end: MB/s, its CPU seconds (``wait4``'s rusage, its threads
    included: it is gone before /proc could be read) and the server's (``TaskCPU``)."""
    served = TaskCPU(server.proc.pid)
    served.start()
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - started
        server_cpu = served.stop()
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"{argv[0]} failed: {err.read().decode(errors='replace')}")
    lines = out.decode().strip().splitlines()
    told = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    seconds = told.get("seconds", elapsed)
    cpu = told.get("cpu", usage.ru_utime + usage.ru_stime)
    return Run(size / seconds / 1e6, cpu, server_cpu)


# --- the cases --------------------------------------------------------------------------------


@dataclass
class Case:
    """One row: ``ours`` and ``ref`` each start what they need and return a Run."""

    name: str
    ours: Callable[[], Run]
    ref: Callable[[], Run]
    tls: bool
    side: str
    runs: dict[str, list[Run]] = field(default_factory=lambda: {"ours": [], "ref": []})


@dataclass
class Setup:
    work: Path
    certs: Path
    image: Path
    size: int
    depth: int

    def dir(self, name: str) -> str:
        return str(self.certs / name)

    def uri(self, sock: Path, tls: bool, export: str = "disk") -> str:
        if not tls:
            return f"nbd+unix:///{export}?socket={sock}"
        return f"nbds+unix:///{export}?socket={sock}&tls-certificates={self.dir('client')}"

    def nbdkit(self, plugin: list[str], tls: bool, name: str) -> tuple[Server, Path]:
        sock = self.work / f"{name}.sock"
        argv = ["nbdkit", "-f", "-U", str(sock)]
        if tls:
            argv += ["--tls=require", f"--tls-certificates={self.dir('server')}"]
        return Server([*argv, *plugin], sock, self.work / f"{name}.log"), sock

    def blockfuse(self, tls: bool) -> tuple[Server, Path]:
        sock = self.work / "blockfuse.sock"
        argv = [str(REPO / ".venv/bin/blockfuse"), "serve", "-d", f"disk={self.image}",
                "--socket", str(sock), "--control", str(sock) + ".ctl"]  # fmt: skip
        if tls:
            argv += ["--tls=require", "--tls-certificates", self.dir("server")]
        return Server(argv, sock, self.work / "blockfuse.log"), sock

    # client side: the reader is compared, nbdkit memory serves both

    def client_run(self, ours: bool, tls: bool, depth: int) -> Run:
        server, sock = self.nbdkit(["memory", str(self.size)], tls, "nbdkit-memory")
        try:
            uri = self.uri(sock, tls)
            if ours:
                argv = [sys.executable, __file__, "--ours-reader", uri, str(self.size), str(depth)]
            else:
                argv = [SYSTEM_PYTHON, "-c", LIBNBD_READER, uri, str(self.size), str(depth)]
            return measured(argv, self.size, server)
        finally:
            server.stop()

    # server side: the server is compared, nbdcopy reads both

    def server_run(self, ours: bool, tls: bool) -> Run:
        if ours:
            server, sock = self.blockfuse(tls)
        else:
            server, sock = self.nbdkit(["file", str(self.image)], tls, "nbdkit-file")
        try:
            argv = ["nbdcopy", "--no-extents", "--connections=1", f"--request-size={MiB}",
                    self.uri(sock, tls), "null:"]  # fmt: skip
            run = measured(argv, self.size, server)
            return Run(run.mbps, run.other_cpu, run.cpu)  # the server is what is compared
        finally:
            server.stop()


def cases(s: Setup) -> list[Case]:
    out = []
    for depth in (1, s.depth):
        for tls in (True, False):
            label = f"client, {'TLS' if tls else 'plaintext'}, {depth} in flight"
            out.append(Case(
                label,
                lambda t=tls, d=depth: s.client_run(True, t, d),  # type: ignore[misc]
                lambda t=tls, d=depth: s.client_run(False, t, d),  # type: ignore[misc]
                tls, "client",
            ))  # fmt: skip
    for tls in (True, False):
        label = f"server, {'TLS' if tls else 'plaintext'}, nbdcopy"
        out.append(Case(
            label,
            lambda t=tls: s.server_run(True, t),  # type: ignore[misc]
            lambda t=tls: s.server_run(False, t),  # type: ignore[misc]
            tls, "server",
        ))  # fmt: skip
    return out


def run_rounds(all_cases: list[Case], rounds: int) -> None:
    for r in range(rounds):
        shift = r % len(all_cases)
        for case in all_cases[shift:] + all_cases[:shift]:
            sides = ("ours", "ref") if r % 2 == 0 else ("ref", "ours")
            for side in sides:
                fn = case.ours if side == "ours" else case.ref
                case.runs[side].append(fn())
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)


# --- the report -------------------------------------------------------------------------------


def report(all_cases: list[Case], rounds: int) -> None:
    print(f"\nsequential 1 MiB reads; medians of {rounds} rounds; ratio = median of per-round "
          f"ours / reference")  # fmt: skip
    print("client: ours vs libnbd (Python binding), from nbdkit memory; "
          "server: ours vs nbdkit file, read by nbdcopy\n")  # fmt: skip
    print("| case | ours MB/s | reference MB/s | ratio | ours CPU s | reference CPU s "
          "| other side's CPU s (ours / ref) | target |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for case in all_cases:
        ours, ref = case.runs["ours"], case.runs["ref"]
        ratio = statistics.median(o.mbps / r.mbps for o, r in zip(ours, ref, strict=True))
        target = ""
        if case.tls:
            target = f"{TARGET}x ({'met' if ratio >= TARGET else 'NOT met'})"
        cells = [
            f"{statistics.median(o.mbps for o in ours):.0f}",
            f"{statistics.median(r.mbps for r in ref):.0f}",
            f"{ratio:.2f}x",
            f"{statistics.median(o.cpu for o in ours):.2f}",
            f"{statistics.median(r.cpu for r in ref):.2f}",
            f"{statistics.median(o.other_cpu for o in ours):.2f} / "
            f"{statistics.median(r.other_cpu for r in ref):.2f}",
            target,
        ]
        print(f"| {case.name} | " + " | ".join(cells) + " |")
    print("\nTLS cost (TLS MB/s / plaintext MB/s, medians):")
    by_name = {c.name: c for c in all_cases}
    for case in all_cases:
        if not case.tls:
            continue
        plain = by_name[case.name.replace("TLS", "plaintext")]
        for side, label in (("ours", "ours"), ("ref", "reference")):
            tls_mbps = statistics.median(r.mbps for r in case.runs[side])
            plain_mbps = statistics.median(r.mbps for r in plain.runs[side])
            print(f"  {case.name.replace(', TLS', '')}, {label}: {tls_mbps / plain_mbps:.2f}")
    print("\nevery round (MB/s):")
    for case in all_cases:
        ours = ", ".join(f"{r.mbps:.0f}" for r in case.runs["ours"])
        ref = ", ".join(f"{r.mbps:.0f}" for r in case.runs["ref"])
        print(f"  {case.name}: ours {ours}; reference {ref}")


def make_image(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n


def make_certs(root: Path) -> None:
    sys.path.insert(0, str(REPO))
    from tests.tlscerts import make_certificates

    make_certificates(root)


def main() -> None:
    args = parse_args()
    if args.ours_reader:
        uri, size, depth = args.ours_reader
        ours_reader(uri, int(size), int(depth))
        return
    for tool, package in [("nbdcopy", "libnbd-bin"), ("nbdkit", "nbdkit"), ("openssl", "openssl")]:
        need(tool, package)
    if not os.path.exists(SYSTEM_PYTHON):
        sys.exit(f"{SYSTEM_PYTHON} is missing (libnbd's Python binding is built for it)")
    size = size_of(args.size)
    top = Path(tempfile.mkdtemp(prefix="bf-tls-bench-"))
    try:
        with tmpfs(top / "fs", size + 64 * MiB) as work:
            (work / "certs").mkdir()
            make_certs(work / "certs")
            image = work / "image.raw"
            make_image(image, size)
            setup = Setup(work, work / "certs", image, size, args.depth)
            all_cases = [c for c in cases(setup) if args.only in (None, c.side)]
            run_rounds(all_cases, max(3, args.rounds))
            report(all_cases, max(3, args.rounds))
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
