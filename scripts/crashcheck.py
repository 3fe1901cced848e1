"""The driver behind scripts/crashcheck: many seeds of blockfuse.testing.crash.run_seed."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blockfuse.testing.crash import run_seed


def main() -> int:
    parser = argparse.ArgumentParser(description="crash-and-fault seeds for the mirror")
    parser.add_argument("--seeds", type=int, default=1000, help="seeds per mode (default 1000)")
    parser.add_argument("--start", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--only", choices=["clean", "faults"], help="one mode instead of both")
    args = parser.parse_args()
    modes = [args.only == "faults"] if args.only else [False, True]
    started, failed = time.monotonic(), 0
    for faults in modes:
        name = "faults" if faults else "clean"
        for n, seed in enumerate(range(args.start, args.start + args.seeds), 1):
            problems = run_seed(seed, faults=faults)
            if problems:
                failed += 1
                print("\n".join(problems), flush=True)
            if n % 500 == 0:
                print(f"{name}: {n} seeds, {time.monotonic() - started:.0f} s", flush=True)
    total = args.seeds * len(modes)
    took = time.monotonic() - started
    print(f"crashcheck: {total} runs ({', '.join('faults' if f else 'clean' for f in modes)}), "
          f"{failed} with problems, {took:.0f} s")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
