from eplbd.cli.main import main

raise SystemExit(main())
