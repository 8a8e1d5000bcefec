"""`python -m dnl_zoo` runs the `dnl-zoo` command line."""

import sys

from dnl_zoo.cli import main

sys.exit(main())
