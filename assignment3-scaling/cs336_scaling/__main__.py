from cs336_scaling.cli import main

raise SystemExit(main())
