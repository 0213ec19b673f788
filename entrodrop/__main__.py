"""``python -m entrodrop`` (and ``accelerate launch -m entrodrop``): the ``entrodrop`` command line."""

import sys

from .cli import main

sys.exit(main())
