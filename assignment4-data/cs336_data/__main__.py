"""`python -m cs336_data` runs the `cs336-data` command."""

import sys

from cs336_data.cli import main

sys.exit(main())
