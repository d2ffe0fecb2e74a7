"""``python -m mullama``: the same entry point as the ``mullama`` command."""

from mullama.cli import main

raise SystemExit(main())
