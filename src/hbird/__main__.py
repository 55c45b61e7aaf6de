"""``python -m hbird``: the same as the ``hbird`` console script."""

import sys

from hbird.cli import main

sys.exit(main())
