"""``python -m sparse_ce``: the ``sparse-ce`` command."""

import sys

from sparse_ce.cli import main

sys.exit(main())
