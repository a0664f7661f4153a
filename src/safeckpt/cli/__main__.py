"""``python -m safeckpt.cli``: the same as the ``safeckpt`` command."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
