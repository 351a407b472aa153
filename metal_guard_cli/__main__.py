"""``python3 -m metal_guard_cli <command>``: the metal-guard CLI under its 0.11 module name."""

from metal_guard_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
