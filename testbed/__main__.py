"""`python -m testbed ...`: the `testbed` command (testbed/cli.py)."""

import sys

from testbed.cli import main

sys.exit(main())
