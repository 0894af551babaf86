"""`python -m service` is the `bedside` command."""

from service.cli import main

raise SystemExit(main())
