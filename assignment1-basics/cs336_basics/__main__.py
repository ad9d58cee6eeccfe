from cs336_basics.cli import main

raise SystemExit(main())
