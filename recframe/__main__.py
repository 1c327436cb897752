"""``python -m recframe`` (what torchrun launches) is the ``recframe`` command."""

import sys

from recframe.cli import main

sys.exit(main())
