"""Test helpers that ship with blockfuse: a conformance suite and a fault injector."""

from .conformance import check_block_device
from .faults import Fault, FaultyDevice

__all__ = ["Fault", "FaultyDevice", "check_block_device"]
