import sys

from cs336_alignment.cli import main

sys.exit(main())
