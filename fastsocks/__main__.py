from fastsocks.cli import main

raise SystemExit(main())
