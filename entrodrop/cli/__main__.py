"""``python -m entrodrop.cli``: the same as the ``entrodrop`` console script."""

import sys

from . import main

sys.exit(main())
