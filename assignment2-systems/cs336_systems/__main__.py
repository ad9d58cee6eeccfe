"""`python -m cs336_systems`: the `cs336-systems` command."""

from cs336_systems.cli import main

raise SystemExit(main())
