"""The mirror: a primary used at once while a background copier fills a secondary.

``device.py`` is the device and its invariant (read it first); ``state.py`` its state
machine and progress; ``copier.py`` the background copy; ``copymap.py`` what is copied
and how a crash is survived; ``parts.py`` the small pieces; ``opening.py`` checking a
pair and starting the copier.
"""

from .device import MirrorDevice, MirrorFailed
from .mapfile import CopyMapError
from .opening import (
    DEFAULT_CHUNK,
    MAX_CHUNK,
    MirrorRefused,
    check_options,
    default_in_flight,
    open_mirror,
    prepare_mirror,
    start_mirror,
)
from .state import MirrorState, MirrorStatistics, Progress

__all__ = [
    "DEFAULT_CHUNK",
    "MAX_CHUNK",
    "CopyMapError",
    "MirrorDevice",
    "MirrorFailed",
    "MirrorRefused",
    "MirrorState",
    "MirrorStatistics",
    "Progress",
    "check_options",
    "default_in_flight",
    "open_mirror",
    "prepare_mirror",
    "start_mirror",
]
