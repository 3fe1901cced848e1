#!/usr/bin/env python3
"""Our NBD server vs qemu-nbd vs nbdkit, serving the same image, in one run.

One image of SIZE random bytes, on a private tmpfs (this VM pages idle page cache out
during a run, so an image there would be read from the disk by some servers and not
others; before the first server starts it is brought to the state the later ones
find, see ``warm``), is exported in turn by
``blockfuse serve -d disk=IMAGE`` (the raw file device, as a user runs it),
``qemu-nbd -f raw -t -e 0`` and ``nbdkit file``, each on a Unix socket, one server at a
time (their image locks would clash).  Each round runs every job once against every
server, the servers in a rotating order; the table gives medians over the rounds of
each number and of the per-round ratio to qemu-nbd, and the server's CPU time per
request (from ``/proc/PID/task/*/schedstat``, steadier here than IOPS):

- ``nbdcopy URI out.raw`` into a sparse file on the same tmpfs (MB/s, the file removed
  after each copy);
- fio's nbd engine, one connection: 4 KiB random read and write at depth 16, 1 MiB
  sequential read and write at depth 4 (IOPS, ``--seconds`` each).

Then each server's memory under load: fio with 64 connections of 16 requests each
(1 MiB random reads) for ``--seconds``; the peak resident size (VmHWM) is printed.

Ratios are to qemu-nbd.  Targets: at least 1.0x for nbdcopy and the 1 MiB jobs, 0.6x
for 4 KiB at depth 16, and our memory bounded (the server holds at most 256 MiB of
request payloads at once).  The machine should be quiet: this is not a timed test.

    .venv/bin/python scripts/bench_serve.py [--size 1G] [--rounds 5] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchlib import REPO, connectable, cpu_ns, need, peak_rss_mib, terminate, tmpfs

MiB = 1 << 20
SERVERS = ("blockfuse", "qemu-nbd", "nbdkit")
FIO_JOBS = {
    "4 KiB random read, depth 16 (IOPS)": ("randread", "4k", 16),
    "4 KiB random write, depth 16 (IOPS)": ("randwrite", "4k", 16),
    "1 MiB sequential read, depth 4 (IOPS)": ("read", "1m", 4),
    "1 MiB sequential write, depth 4 (IOPS)": ("write", "1m", 4),
}
COPY_JOB = "nbdcopy to a sparse file (MB/s)"
TARGETS = {COPY_JOB: 1.0, **{job: (0.6 if "4 KiB" in job else 1.0) for job in FIO_JOBS}}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="1G", help="image size (default 1G)")
    p.add_argument("--rounds", type=int, default=5, help="rounds; the median counts")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per fio job")
    p.add_argument("--memory-connections", type=int, default=64)
    p.add_argument(
        "--only", action="append", default=[], metavar="TEXT",
        help="only the jobs whose name contains TEXT (repeatable; no memory run)",
    )  # fmt: skip
    return p.parse_args()


def size_of(text: str) -> int:
    units = {"K": 10, "M": 20, "G": 30}
    return int(text[:-1]) << units[text[-1].upper()] if text[-1].isalpha() else int(text)


# --- servers ------------------------------------------------------------------------------


def server_argv(name: str, image: Path, sock: Path) -> list[str]:
    if name == "blockfuse":
        return [str(REPO / ".venv/bin/blockfuse"), "serve", "-d", f"disk={image}",
                "--socket", str(sock), "--control", str(sock) + ".ctl"]  # fmt: skip
    if name == "qemu-nbd":
        return ["qemu-nbd", "-f", "raw", "-t", "-e", "0", "-x", "disk", "-k", str(sock), str(image)]
    return ["nbdkit", "-f", "-U", str(sock), "file", str(image)]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    sock: Path

    @property
    def uri(self) -> str:
        return f"nbd+unix:///disk?socket={self.sock}"

    def stop(self) -> None:
        terminate(self.proc, 60)


def start(name: str, image: Path, workdir: Path) -> Server:
    sock = workdir / f"{name}.sock"
    sock.unlink(missing_ok=True)  # nbdkit does not reuse a socket file left behind
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - the server's for its life
    proc = subprocess.Popen(server_argv(name, image, sock), stdout=log, stderr=log,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 30
    while not connectable(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"{name} did not start: {(workdir / f'{name}.log').read_text()}")
        time.sleep(0.02)
    return Server(name, proc, sock)


# --- jobs -----------------------------------------------------------------------------------


def nbdcopy(server: Server, workdir: Path, size: int) -> float:
    out = workdir / "out.raw"
    started = time.perf_counter()
    subprocess.run(["nbdcopy", server.uri, str(out)], check=True, timeout=600)
    elapsed = time.perf_counter() - started
    out.unlink()
    return size / elapsed / 1e6


def fio(uri: str, rw: str, bs: str, depth: int, seconds: float, jobs: int = 1) -> dict[str, float]:
    argv = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
            f"--bs={bs}", f"--iodepth={depth}", f"--numjobs={jobs}", "--time_based",
            f"--runtime={seconds}", "--group_reporting", "--output-format=json"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, check=True,
                         cwd=tempfile.gettempdir())  # fmt: skip
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    return {"read": job["read"]["iops"], "write": job["write"]["iops"]}


Measure = tuple[float, float]
"""A job's figure (MB/s or IOPS) and the server's CPU µs per request (nan: not counted)."""


def fio_job(rw: str, bs: str, depth: int, seconds: float) -> Callable[[Server], Measure]:
    def run(server: Server) -> Measure:
        cpu = cpu_ns(server.proc.pid)
        iops = fio(server.uri, rw, bs, depth, seconds)["write" if "write" in rw else "read"]
        used = cpu_ns(server.proc.pid) - cpu
        return iops, used / 1e3 / max(1.0, iops * seconds)

    return run


# --- the run ----------------------------------------------------------------------------------


def make_image(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n


WARM_READS = 3


def warm(image: Path, workdir: Path) -> None:
    """Bring the tmpfs to the state every server meets later: the image read through
    ``WARM_READS`` times, and a file of its size written and removed, as each nbdcopy
    does with its copy (the tmpfs holds pages of 4 KiB whatever is done).  Without the
    reads, nbdcopy from the first server after ``make_image`` ran at 550-830 MB/s and
    from the next at 1100-1300; after two reads beforehand, 950-1590 for both.  The
    rotation puts blockfuse first in round one."""
    for _ in range(WARM_READS):
        with open(image, "rb") as f:
            while f.read(16 * MiB):
                pass
    scratch = workdir / "out.raw"
    make_image(scratch, image.stat().st_size)
    scratch.unlink()


Results = dict[str, dict[str, list[Measure]]]
"""job -> server -> one number per round."""


def rounds(args: argparse.Namespace, image: Path, workdir: Path, size: int) -> Results:
    jobs: dict[str, Callable[[Server], Measure]] = {
        COPY_JOB: lambda server: (nbdcopy(server, workdir, size), float("nan"))
    }
    for job, (rw, bs, depth) in FIO_JOBS.items():
        jobs[job] = fio_job(rw, bs, depth, args.seconds)
    if args.only:
        jobs = {job: run for job, run in jobs.items() if any(t in job for t in args.only)}
    results: Results = {j: {s: [] for s in SERVERS} for j in jobs}
    for r in range(args.rounds):
        order = SERVERS[r % 3 :] + SERVERS[: r % 3]
        for name in order:
            server = start(name, image, workdir)
            try:
                for job, run in jobs.items():
                    results[job][name].append(run(server))
            finally:
                server.stop()
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    return results


def memory(args: argparse.Namespace, image: Path, workdir: Path) -> dict[str, float]:
    out = {}
    for name in SERVERS:
        server = start(name, image, workdir)
        try:
            fio(server.uri, "randread", "1m", 16, args.seconds, jobs=args.memory_connections)
            out[name] = peak_rss_mib(server.proc.pid)
        finally:
            server.stop()
    return out


def report(results: Results, rss: dict[str, float], rounds_: int) -> None:
    print(f"\nmedians of {rounds_} rounds (rotated order); ratio = blockfuse / qemu-nbd, per"
          " round; CPU = the server's µs per request\n")  # fmt: skip
    print("| job | blockfuse | qemu-nbd | nbdkit | ratio | target | CPU µs ours / qemu-nbd |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for job, by_server in results.items():
        med = {s: statistics.median(v for v, _ in runs) for s, runs in by_server.items()}
        cpu = {s: statistics.median(c for _, c in runs) for s, runs in by_server.items()}
        pairs = zip(by_server["blockfuse"], by_server["qemu-nbd"], strict=True)
        ratio = statistics.median(
            ours / ref if ref else float("nan") for (ours, _), (ref, _) in pairs
        )
        cells = " | ".join(f"{med[s]:.0f}" for s in SERVERS)
        mark = "met" if ratio >= TARGETS[job] else "NOT met"
        cpu_cell = (
            f"{cpu['blockfuse']:.1f} / {cpu['qemu-nbd']:.1f}"
            if not math.isnan(cpu["qemu-nbd"])
            else ""
        )
        print(f"| {job} | {cells} | {ratio:.2f}x | {TARGETS[job]:.1f}x ({mark}) | {cpu_cell} |")
    if rss:
        cells = " | ".join(f"{rss[s]:.0f} MiB" for s in SERVERS)
        print(f"| peak RSS, 64 connections x 16 x 1 MiB reads | {cells} | | | |")
    print("\nevery round:")
    for job, by_server in results.items():
        runs = "; ".join(f"{s} " + ", ".join(f"{v:.0f}" for v, _ in by_server[s]) for s in SERVERS)
        print(f"  {job}: {runs}")


def main() -> None:
    args = parse_args()
    for tool, package in [("nbdcopy", "libnbd-bin"), ("fio", "fio"), ("qemu-nbd", "qemu-utils"),
                          ("nbdkit", "nbdkit")]:  # fmt: skip
        need(tool, package)
    size = size_of(args.size)
    scratch = Path(tempfile.mkdtemp(prefix="bf-bench-"))
    try:
        with tmpfs(scratch / "pinned", 2 * size + 64 * MiB) as workdir:
            image = workdir / "image.raw"
            make_image(image, size)
            warm(image, workdir)
            results = rounds(args, image, workdir, size)
            rss = {} if args.only else memory(args, image, workdir)
        report(results, rss, args.rounds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
