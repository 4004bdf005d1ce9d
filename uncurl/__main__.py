"""`python -m uncurl ...` is the `uncurl` command."""

from .cli import main

main()
