from trackbuf.cli import main

raise SystemExit(main())
