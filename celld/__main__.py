from celld.cli import main

raise SystemExit(main())
