from fleeced.cli import main

raise SystemExit(main())
