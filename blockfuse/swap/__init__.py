"""swapfs: short-lived files kept on a block device (``--scratch`` directories).

``handles.py`` is the file system of handles and its invariants (read it first);
``space.py`` the free-space map and the layout arithmetic.
"""

from .handles import DEFAULT_UNIT, Handle, Swap, open_swap
from .space import FreeSpace, UnitRun

__all__ = ["DEFAULT_UNIT", "FreeSpace", "Handle", "Swap", "UnitRun", "open_swap"]
