"""``python -m metal_guard`` runs the command line."""

from metal_guard.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
