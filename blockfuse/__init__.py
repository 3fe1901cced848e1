"""blockfuse: compose block devices in userspace and show each as a flat file in a FUSE mount."""

import logging

__version__ = "0.1.0"

# A library says nothing until its user sets up logging (the CLI does: ``log.setup``).
logging.getLogger(__name__).addHandler(logging.NullHandler())
