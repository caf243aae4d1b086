from trioproxy.cli import main

raise SystemExit(main())
