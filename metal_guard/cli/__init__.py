"""The ``metal-guard`` command line.

Every subcommand lives in a submodule of this package that exposes ``register(subparsers)``
and sets ``func(args) -> int`` on its parser. ``--json`` works before or after the
subcommand. Exit codes come from one table (:data:`EXIT_CODES`, also in the README); a usage
error is 64 and never collides with a verdict.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from metal_guard._version import __version__

EXIT_OK = 0
EXIT_WARN = 1
EXIT_COOLDOWN = 2
EXIT_GATE_BROKEN = 3
EXIT_FAILED = 4
EXIT_BLOCKED = 10
EXIT_FAIL_OPEN = 11
EXIT_SERVE_BREAKER = 12
EXIT_USAGE = 64
EXIT_SERVER_GAVE_UP = 69
EXIT_INTERNAL = 70

#: code -> meaning; rendered into README/docs and checked by tests.
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success / proceed / healthy",
    EXIT_WARN: "finding that needs attention (panics in window, orphans found, advisory found)",
    EXIT_COOLDOWN: "panic cooldown or lockout active: do not start MLX work",
    EXIT_GATE_BROKEN: "the gate could not evaluate (e.g. a configured reports dir is unreadable)",
    EXIT_FAILED: "the command failed (I/O error, invalid input file, worker failure)",
    EXIT_BLOCKED: "mlx-safe-python: blocked by an active cooldown",
    EXIT_FAIL_OPEN: "mlx-safe-python: gate broken, command ran anyway (fail-open)",
    EXIT_SERVE_BREAKER: "serve: the server kept crashing and the circuit breaker opened; "
                        "the front exited so the service manager takes over",
    EXIT_USAGE: "usage error (bad arguments or configuration)",
    EXIT_SERVER_GAVE_UP: "`run -- mlx_lm.server`: the guarded server gave up (generation cannot make progress); restart it",
    EXIT_INTERNAL: "internal error (a bug: please report it)",
}

#: Submodules that contribute subcommands, in help order.
_COMMAND_MODULES: tuple[str, ...] = (
    "metal_guard.cli.status", "metal_guard.cli.forensics", "metal_guard.cli.launchd",
    "metal_guard.cli.doctor",
    "metal_guard.cli.state",
    "metal_guard.cli.cadence",
    "metal_guard.cli.knowledge",
    "metal_guard.cli.run",
    "metal_guard.cli.serve",
    "metal_guard.cli.demo",
)

#: Subcommand -> the module that registers it. Lets ``main`` import only the module of the
#: command being run (``panic-gate`` must not pay for importing every other command);
#: a test checks it against what the modules really register.
_COMMANDS: dict[str, str] = {
    "status": "metal_guard.cli.status",
    "status-write": "metal_guard.cli.status",
    "breadcrumb": "metal_guard.cli.status",
    "mode": "metal_guard.cli.status",
    "panic-gate": "metal_guard.cli.forensics",
    "ack": "metal_guard.cli.forensics",
    "panics": "metal_guard.cli.forensics",
    "postmortem": "metal_guard.cli.forensics",
    "orphan-scan": "metal_guard.cli.forensics",
    "launchd-plist": "metal_guard.cli.launchd",
    "doctor": "metal_guard.cli.doctor",
    "lock": "metal_guard.cli.state",
    "breaker": "metal_guard.cli.state",
    "cadence": "metal_guard.cli.cadence",
    "check-model": "metal_guard.cli.knowledge",
    "advisories": "metal_guard.cli.knowledge",
    "registry": "metal_guard.cli.knowledge",
    "run": "metal_guard.cli.run",
    "serve": "metal_guard.cli.serve",
    "demo": "metal_guard.cli.demo",
}

#: The subcommand run when none is given (the seed runs ``status``).
DEFAULT_COMMAND = "status"


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error; ours exits 64 (EX_USAGE)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser(modules: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser, or one with only the subcommands of ``modules``."""
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable JSON output")
    parser = _Parser(
        prog="metal-guard",
        description="GPU safety layer for MLX on Apple Silicon.",
        parents=[common],
        epilog="exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()),
    )
    parser.add_argument("--version", action="version", version=f"metal-guard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub._metal_guard_common = common  # type: ignore[attr-defined]
    for name in _COMMAND_MODULES if modules is None else modules:
        importlib.import_module(name).register(sub)
    return parser


def add_command(subparsers: Any, name: str, *, help: str, **kwargs: Any) -> argparse.ArgumentParser:
    """Add a subcommand parser that also accepts ``--json`` after the subcommand name."""
    parents = [subparsers._metal_guard_common]
    return subparsers.add_parser(name, help=help, description=help, parents=parents, **kwargs)  # type: ignore[no-any-return]


def _json_default(value: Any) -> Any:
    """Result dataclasses become their ``as_dict()``; anything else its ``str()``."""
    as_dict = getattr(value, "as_dict", None)
    return as_dict() if callable(as_dict) else str(value)


def emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    """Print ``payload`` as JSON with ``--json``, else ``text``."""
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, sort_keys=True, default=_json_default))
    else:
        print(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metal-guard`` console script; returns the exit code
    (console scripts pass it to ``sys.exit``)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if not a.startswith("-")), None)
    if command is None and not any(a in ("-h", "--help", "--version") for a in args_list):
        command = DEFAULT_COMMAND
        args_list = [*args_list, DEFAULT_COMMAND]
    module = _COMMANDS.get(command or "")
    parser = build_parser(None if module is None else [module])
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help / --version / usage error
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if getattr(args, "json", None) is None:
        args.json = False
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from metal_guard.errors import SettingsError

    try:
        return int(func(args))
    except SettingsError as exc:
        print(f"metal-guard: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except OSError as exc:  # state files, directories, a full disk: documented as exit 4
        print(f"metal-guard: I/O error: {exc}"[:2000], file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        logging.getLogger("metal_guard.cli").debug("internal error", exc_info=True)
        print(f"metal-guard: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL


