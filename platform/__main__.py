"""`python -m bagel.platform` runs the `bagel` command line."""

import sys

from bagel.platform.cli import main

sys.exit(main())
