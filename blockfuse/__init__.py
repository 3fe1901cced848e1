"""blockfuse: compose block devices in userspace and show each as a flat file in a FUSE mount."""

__version__ = "0.1.0"
