"""`python -m keyfailover`: the same as the `keyfailover` command."""

import sys

from keyfailover.cli import main

sys.exit(main())
