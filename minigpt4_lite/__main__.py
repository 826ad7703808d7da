"""`python -m minigpt4_lite ...`: see `cli.py`."""

from .cli import main

raise SystemExit(main())
