"""One module per device or wrapper."""
