"""`python -m adadiff_export COMMAND --help`."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
