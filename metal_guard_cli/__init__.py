"""metal-guard 0.11 compatibility: the reference shipped its CLI as the module ``metal_guard_cli``.

Its README documents ``python3 -m metal_guard_cli panic-gate`` as the launchd fallback when the
``metal-guard`` script is not on ``PATH``; this shim keeps that (and ``from metal_guard_cli
import main, safe_python_main``) working. It imports nothing until called, so
``python3 -m metal_guard_cli panic-gate`` costs what ``metal-guard panic-gate`` costs, and it
returns the same exit codes (see ``metal-guard --help``).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main", "safe_python_main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``metal-guard [COMMAND] ...``; returns the exit code."""
    from metal_guard.cli import main as _main

    return _main(argv)


def safe_python_main(argv: Sequence[str] | None = None) -> int:
    """``mlx-safe-python ...``; returns the exit code (or replaces the process)."""
    from metal_guard.cli.safe_python import main as _main

    return _main(argv)
