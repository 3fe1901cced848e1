"""What the suite itself must not do to the machine it runs on."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from blockfuse.cli.registry import ENV


def test_servers_the_suite_starts_register_in_a_private_runtime_directory() -> None:
    """A test's server that is killed leaves its entry behind: that must not be in the
    machine's own runtime directory (``/run/blockfuse``), where ``blockfuse status``
    and a user look."""
    where = os.environ.get(ENV)
    assert where is not None, f"{ENV} is not set for the suite"
    assert Path(where).is_relative_to(tempfile.gettempdir())
