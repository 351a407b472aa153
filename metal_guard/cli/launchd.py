"""``metal-guard launchd-plist``: print ready-to-load launchd property lists.

* ``launchd-plist status-writer`` — the L13 daemon (``status-write --interval N``, KeepAlive);
* ``launchd-plist gate-job --label L -- CMD ...`` — runs ``CMD`` only when ``panic-gate``
  says proceed. A refusal (exit 2/3) makes launchd retry after ``ThrottleInterval`` seconds
  (``KeepAlive`` with ``SuccessfulExit=false``), so the job starts by itself once the cooldown
  ends and never restarts into a panic loop.

The plist goes to stdout (redirect it into ``~/Library/LaunchAgents/<label>.plist``); how to
load it goes to stderr. The interpreter path is absolute because launchd's PATH is minimal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from metal_guard.cli import EXIT_OK, EXIT_USAGE, add_command

DEFAULT_STATUS_LABEL = "com.metal-guard.status-writer"
#: sh script: run the gate (its verdict goes to the job's stderr log), then exec the job.
GATE_SCRIPT = '"$0" -m metal_guard panic-gate 1>&2 || exit $?; exec "$@"'


def _log_paths(label: str, log_dir: str | None) -> dict[str, str]:
    base = Path(log_dir).expanduser() if log_dir else Path.home() / "Library/Logs/metal-guard"
    return {"StandardOutPath": str(base / f"{label}.log"),
            "StandardErrorPath": str(base / f"{label}.err.log")}


def _environment(extra: list[str]) -> dict[str, str]:
    from metal_guard.settings import get_settings

    env: dict[str, str] = {}
    home = get_settings().home
    if home is not None:
        env["METALGUARD_HOME"] = str(home)
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--env expects KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def status_writer_plist(*, label: str = DEFAULT_STATUS_LABEL, interval: float = 30.0,
                        python: str | None = None, log_dir: str | None = None,
                        env: list[str] | None = None) -> dict[str, Any]:
    plist: dict[str, Any] = {
        "Label": label,
        "ProgramArguments": [python or sys.executable, "-m", "metal_guard", "status-write",
                             "--interval", f"{interval:g}"],
        "RunAtLoad": True, "KeepAlive": True, "ProcessType": "Background",
        "ThrottleInterval": 30, **_log_paths(label, log_dir),
    }
    environment = _environment(env or [])
    if environment:
        plist["EnvironmentVariables"] = environment
    return plist


def gate_job_plist(command: list[str], *, label: str, throttle_sec: int = 300,
                   python: str | None = None, log_dir: str | None = None,
                   env: list[str] | None = None, working_dir: str | None = None) -> dict[str, Any]:
    if not command:
        raise ValueError("gate-job needs the command to run after `--`")
    plist: dict[str, Any] = {
        "Label": label,
        "ProgramArguments": ["/bin/sh", "-c", GATE_SCRIPT, python or sys.executable, *command],
        "RunAtLoad": True, "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": int(throttle_sec), **_log_paths(label, log_dir),
    }
    if working_dir:
        plist["WorkingDirectory"] = working_dir
    environment = _environment(env or [])
    if environment:
        plist["EnvironmentVariables"] = environment
    return plist


def _options_parser() -> argparse.ArgumentParser:
    from metal_guard.cli import _Parser

    p = _Parser(prog="metal-guard launchd-plist KIND", add_help=False)
    p.add_argument("--json", action="store_true")
    p.add_argument("--label", default=None, help="launchd Label (reverse-DNS)")
    p.add_argument("--interval", type=float, default=30.0, help="status-writer interval (s)")
    p.add_argument("--throttle-sec", type=int, default=300,
                   help="gate-job: seconds before launchd retries after a refusal")
    p.add_argument("--python", default=None,
                   help="interpreter with metal-guard installed (default: this one)")
    p.add_argument("--log-dir", default=None, help="default ~/Library/Logs/metal-guard")
    p.add_argument("--working-dir", default=None)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the job (repeatable)")
    return p


def _cmd_plist(args: argparse.Namespace) -> int:
    rest = list(args.rest or [])
    split = rest.index("--") if "--" in rest else len(rest)
    options, command = rest[:split], rest[split + 1:]
    try:
        opts = _options_parser().parse_args(options)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    args.json = bool(args.json or opts.json)
    for key, value in vars(opts).items():
        if key != "json":
            setattr(args, key, value)
    try:
        if args.kind == "status-writer":
            if command:
                raise ValueError("status-writer takes no command")
            if args.interval <= 0:
                raise ValueError("--interval must be > 0")
            label = args.label or DEFAULT_STATUS_LABEL
            plist = status_writer_plist(label=label, interval=args.interval, python=args.python,
                                        log_dir=args.log_dir, env=args.env)
        else:
            if not args.label:
                raise ValueError("gate-job needs --label (e.g. com.example.mlx-server)")
            if args.throttle_sec < 1:
                raise ValueError("--throttle-sec must be >= 1")
            label = args.label
            plist = gate_job_plist(command, label=label, throttle_sec=args.throttle_sec,
                                   python=args.python, log_dir=args.log_dir, env=args.env,
                                   working_dir=args.working_dir)
    except ValueError as exc:
        print(f"metal-guard launchd-plist: {exc}", file=sys.stderr)
        return EXIT_USAGE
    import plistlib

    xml = plistlib.dumps(plist, sort_keys=False).decode("utf-8")
    target = f"~/Library/LaunchAgents/{label}.plist"
    if args.json:
        import json

        print(json.dumps({"label": label, "install_path": target, "plist": plist, "xml": xml},
                         indent=2))
    else:
        sys.stdout.write(xml)
        print(f"# save as {target}, then: launchctl bootstrap gui/$(id -u) {target}\n"
              f"# logs: {plist['StandardErrorPath']}", file=sys.stderr)
    return EXIT_OK


def register(subparsers: Any) -> None:
    p = add_command(
        subparsers, "launchd-plist",
        help="print a launchd plist for the status writer or a gate-wrapped job",
        epilog="options after KIND: --label L, --interval N (status-writer), --throttle-sec N, "
               "--python PATH, --log-dir DIR, --working-dir DIR, --env KEY=VALUE; "
               "gate-job takes the command after `--`",
    )
    p.add_argument("kind", choices=("status-writer", "gate-job"))
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="[OPTIONS] [-- COMMAND ...]")
    p.set_defaults(func=_cmd_plist)
