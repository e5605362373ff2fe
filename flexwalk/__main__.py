"""`python -m flexwalk ...`: the same as the `flexwalk` console script."""

from .cli import main

raise SystemExit(main())
