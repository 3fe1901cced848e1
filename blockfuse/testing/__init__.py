"""Test helpers that ship with blockfuse: a conformance suite, the pass-through wrapper
base, and a fault injector."""

from ..devices.wrapper import PassThrough
from .conformance import check_block_device
from .faults import Fault, FaultyDevice

__all__ = ["Fault", "FaultyDevice", "PassThrough", "check_block_device"]
