"""`python -m headstart.core.backbones`: the catalog of backbones (see catalog.py)."""

from headstart.core.backbones.catalog import main

if __name__ == "__main__":
    raise SystemExit(main())
