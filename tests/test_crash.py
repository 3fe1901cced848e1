"""The crash-and-fault harness (``blockfuse.testing.crash``) over a bounded number of
seeds: a mirror with racing writers and fsyncs, power cut at many points, every promise
checked.  ``scripts/crashcheck --seeds N`` runs thousands."""

from __future__ import annotations

import random

import pytest

from blockfuse.testing.crash import Promises, run_seed
from blockfuse.testing.simulated import SimDisk

SEEDS = 60


@pytest.mark.parametrize("faults", [False, True], ids=["clean", "faults"])
def test_no_crash_breaks_a_promise(faults: bool) -> None:
    problems = [p for seed in range(SEEDS) for p in run_seed(seed, faults=faults)]
    assert not problems, "\n".join(problems[:20])


def test_a_crash_image_is_stable_data_plus_some_of_the_rest() -> None:
    disk = SimDisk(bytes(4 * 512), rng=random.Random(1))
    disk.pending = [(1, 0, b"a" * 512), (2, 0, b"b" * 512), (3, 1, b"c" * 512)]
    seen = {disk.crash_image(random.Random(n))[:1024] for n in range(64)}
    assert seen == {
        bytes(1024),
        b"a" * 512 + bytes(512),
        b"b" * 512 + bytes(512),
        bytes(512) + b"c" * 512,
        b"a" * 512 + b"c" * 512,
        b"b" * 512 + b"c" * 512,
    }


def test_promises_follow_fsync_and_forget_what_a_failed_fsync_covered() -> None:
    p = Promises(bytes(512))
    w1 = p.issue(0, b"1" * 512)
    w1.state = "acked"
    covered = p.fsync_began()
    p.fsync_ended(covered, True)
    assert p.snapshot()(0) == {b"1" * 512}
    w2 = p.issue(0, b"2" * 512)
    w2.state = "acked"
    p.fsync_ended(p.fsync_began(), False)  # may have lost w2
    w3 = p.issue(0, b"3" * 512)
    w3.state = "acked"
    p.fsync_ended(p.fsync_began(), True)  # promises w3 only
    assert p.snapshot()(0) == {b"3" * 512}
