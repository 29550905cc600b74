"""`python -m imdsd` runs the command line."""

from __future__ import annotations

from imdsd.cli import main

raise SystemExit(main())
