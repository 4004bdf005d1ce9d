"""`python -m uncurl ...` is the `uncurl` command."""

from .cli import main

if __name__ == "__main__":
    main()
