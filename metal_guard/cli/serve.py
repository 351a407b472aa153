"""``metal-guard serve [options] -- mlx_lm.server <args>``: a server that survives its own crash.

The front binds the server's ``--host/--port``; the server runs as a guarded child on a
private loopback port (see :mod:`metal_guard.serve`). Exit codes: 0 after SIGTERM/SIGINT,
2 panic cooldown, 4 starts keep failing, 12 circuit breaker open, 64 usage error.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from pathlib import Path

from metal_guard.cli import EXIT_FAILED, EXIT_USAGE, add_command


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(subparsers, "serve",
                    help="run mlx_lm.server / mlx_vlm.server behind a front that survives its crash",
                    usage="metal-guard serve [options] -- mlx_lm.server --model MODEL [args...]")
    p.add_argument("--standby", action="store_true",
                   help="keep a second child loaded and idle; switch to it on a crash")
    p.add_argument("--ready-timeout", type=_seconds, default=600.0, metavar="SEC",
                   help="how long a child may take to load and answer (default 600)")
    p.add_argument("--stop-grace", type=_seconds, default=10.0, metavar="SEC",
                   help="SIGTERM-to-SIGKILL grace when stopping a child (default 10)")
    p.add_argument("--max-start-failures", type=_count, default=5, metavar="N",
                   help="exit (code 4) after N starts in a row that never became ready (default 5)")
    p.add_argument("--backoff", type=_seconds, default=0.5, metavar="SEC",
                   help="first respawn delay after a crash, doubled per crash in a row (default 0.5)")
    p.add_argument("--backoff-max", type=_seconds, default=30.0, metavar="SEC",
                   help="longest respawn delay (default 30)")
    p.add_argument("--upstream-timeout", type=_seconds, default=600.0, metavar="SEC",
                   help="longest silence from the child on one request (default 600)")
    p.add_argument("--max-body-mb", type=_seconds, default=64.0, metavar="MB",
                   help="largest request body accepted (default 64)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="ready = /health answers 200 (default: also a 1-token completion)")
    p.add_argument("--log-file", type=Path, metavar="PATH",
                   help="the children's log (default <state>/serve/<host>-<port>.log)")
    p.add_argument("--watch", choices=("auto", "pdeathsig", "pipe"), default="auto",
                   help=argparse.SUPPRESS)
    p.add_argument("--adapters", help="comma-separated adapters to enable in the child")
    p.add_argument("--disable-adapters", dest="disabled_adapters",
                   help="comma-separated adapters to disable in the child")
    p.add_argument("--mode", choices=("defensive", "observer"), help="METALGUARD_MODE for both")
    p.add_argument("--strict", action="store_true", help="METALGUARD_STRICT=1 in the child")
    p.add_argument("-v", "--verbose", action="store_true", help="log the front's decisions")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the server command and its arguments")
    p.set_defaults(func=run, shim=None)


def _resolve(program: str, path_env: str | None) -> str | None:
    """The executable for ``program``: on PATH, else next to this Python (same venv)."""
    if "/" in program:
        return program if Path(program).exists() else None
    found = shutil.which(program, path=path_env)
    if found:
        return found
    sibling = Path(sys.executable).parent / program
    if sibling.exists():
        return str(sibling)
    if program.startswith("python"):
        return sys.executable
    return None


def run(args: argparse.Namespace) -> int:
    import os

    from metal_guard.cli.run import build_env
    from metal_guard.serve.command import CommandError, ServerCommand, parse_command

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s metal-guard serve %(levelname)s %(message)s")
    try:
        command = parse_command(list(args.command))
    except CommandError as exc:
        print(f"metal-guard serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.mode:
        os.environ["METALGUARD_MODE"] = args.mode  # the front's own admission decisions too
    env, _ = build_env(args)
    program = _resolve(command.prefix[0], env.get("PATH"))
    if program is None:
        print(f"metal-guard serve: command not found: {command.prefix[0]}", file=sys.stderr)
        return 127
    command = ServerCommand(prefix=(program, *command.prefix[1:]), args=command.args,
                            family=command.family, host=command.host, port=command.port,
                            model=command.model)
    from metal_guard.serve.app import serve
    from metal_guard.serve.supervisor import ServeOptions

    options = ServeOptions(standby=args.standby, ready_timeout_sec=args.ready_timeout,
                           stop_grace_sec=args.stop_grace, max_start_failures=args.max_start_failures,
                           backoff_base_sec=args.backoff, backoff_max_sec=args.backoff_max,
                           warmup=args.warmup, watch=args.watch, env=env)
    try:
        return serve(command, options, log_path=args.log_file,
                     upstream_timeout=args.upstream_timeout,
                     max_body_bytes=int(args.max_body_mb * (1 << 20)))
    except OSError as exc:
        print(f"metal-guard serve: {exc}", file=sys.stderr)
        return EXIT_FAILED
