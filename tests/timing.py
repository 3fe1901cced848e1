"""A per-test time limit by SIGALRM, so that a hung I/O test fails instead of hanging."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from types import FrameType

import pytest


def time_limit(seconds: int) -> Callable[[], Iterator[None]]:
    """An autouse fixture failing each test of the module after ``seconds``."""

    @pytest.fixture(autouse=True)
    def limit() -> Iterator[None]:
        def expire(signum: int, frame: FrameType | None) -> None:
            raise TimeoutError(f"the test ran for more than {seconds} seconds")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    return limit
