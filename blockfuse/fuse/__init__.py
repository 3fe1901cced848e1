"""The FUSE front end: one flat file per device."""
