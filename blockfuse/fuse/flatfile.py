"""One device seen as a flat file of bytes: the FUSE handlers' only way to a device.

The byte-level behaviour is ``blockfuse.sectors.DeviceBytes`` (shared with the NBD
server); this adds what the file shows: its name, the spec it came from (with the size
it has now, once resized), and the controls (``user.blockfuse.KEY`` writes).  No pyfuse3
here.
"""

from __future__ import annotations

from ..block import BlockDevice, send_control
from ..sectors import DeviceBytes
from ..spec import resized_spec


class FlatFile(DeviceBytes):
    def __init__(self, name: str, device: BlockDevice, *, kind: str, spec: str) -> None:
        super().__init__(device)
        self.name = name
        self.kind = kind
        self.spec = spec

    async def resize(self, size_bytes: int) -> None:
        """Resize the device; ``spec`` then says the new size (``mem(2G)``)."""
        await super().resize(size_bytes)
        self.spec = resized_spec(self.spec, size_bytes)

    async def control(self, key: str, value: bytes) -> None:
        """Hand ``user.blockfuse.KEY`` to the first layer (outermost first) that takes it."""
        await send_control(self.device, key, value, self.name)
