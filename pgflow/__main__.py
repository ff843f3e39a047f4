from pgflow.cli import main

raise SystemExit(main())
