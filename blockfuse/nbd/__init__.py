"""The sans-io NBD protocol core: bytes in, events out; events in, bytes out.

Nothing here does I/O or imports trio, socket or pyfuse3 (a test checks); the trio glue
lives in ``blockfuse.transport``.
"""
