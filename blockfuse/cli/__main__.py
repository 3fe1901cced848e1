"""``python -m blockfuse.cli``: the same as the ``blockfuse`` command."""

import sys

from . import main

sys.exit(main())
