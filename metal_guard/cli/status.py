"""Status subcommands: ``status`` (the default), ``status-write``, ``breadcrumb``, ``mode``.

``status`` exits with its worst health, in every format (text, ``--json``, Prometheus):
3 gate broken (the gate could not evaluate — its verdict says so, or its collector failed),
2 cooldown/lockout active, 1 warn (GPU panics/aborts, open breaker, another collector failed),
0 ok. The exit code and the label shown always agree. ``status-write`` writes ``status.json`` plus the
node-exporter ``status.prom`` next to it, once or as a SIGTERM-clean daemon. Nothing here
imports ``mlx``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from metal_guard.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_command, emit


def _render_text(snap: dict[str, Any], code: int, label: str) -> str:
    gate = snap.get("panic_cooldown") or {}
    mem = snap.get("memory") or {}
    lock = snap.get("lock") or {}
    breaker = snap.get("breaker") or {}
    gpu = snap.get("gpu") or {}
    lines = [f"metal-guard {snap.get('metal_guard_version')}  [{label}]  {snap.get('captured_at')}"]
    if gate:
        lines.append(f"  gate       {str(gate.get('state', '?')).upper()} (exit {gate.get('exit_code')}):"
                     f" {gate.get('reason')}")
    elif "panic_cooldown" in (snap.get("errors") or {}):
        lines.append(f"  gate       BROKEN: it could not evaluate ({snap['errors']['panic_cooldown']})")
        lines.append(f"  panics     {gate.get('recent_panics_24h')} GPU in 24h, "
                     f"{gate.get('recent_panics_72h')} GPU in 72h; "
                     f"{gate.get('abort_count_24h')} GPU abort(s) in 24h")
    if mem.get("available"):
        lines.append(f"  memory     active {mem.get('active_gb')} GB, peak {mem.get('peak_gb')} GB, "
                     f"limit {mem.get('limit_gb')} GB across {mem.get('process_count')} process(es)")
    elif mem:
        lines.append(f"  memory     unavailable ({mem.get('reason')})")
    if lock:
        holder = f"held by pid {lock.get('pid')} ({lock.get('label')})" if lock.get("held") else "free"
        lines.append(f"  lock       {holder}")
    if breaker:
        state = "OPEN" if breaker.get("in_cooldown") else "closed"
        lines.append(f"  breaker    {state}")
    lines.append(f"  mode       {(snap.get('mode') or {}).get('current', '?')}")
    if gpu:
        lines.append(f"  gpu        {gpu.get('family', 'unknown')} ({gpu.get('source', '')})")
    advisories = snap.get("advisories") or []
    if advisories:
        lines.append(f"  advisories {len(advisories)}: "
                     + ", ".join(str(a.get("id")) for a in advisories[:5] if isinstance(a, dict)))
    tail = snap.get("breadcrumb_tail") or []
    if tail:
        lines.append("  breadcrumbs (newest last):")
        lines += [f"    {line}" for line in tail[-10:]]
    for name, err in (snap.get("errors") or {}).items():
        lines.append(f"  error      {name}: {err}")
    return "\n".join(lines)


def health(snap: dict[str, Any]) -> tuple[int, str]:
    """The snapshot's worst health: :func:`~metal_guard.status.snapshot_health`, raised to
    3 ("GATE BROKEN") when the gate's collector itself failed — the gate could not evaluate,
    which is worse than a warning (it is what exit 3 means)."""
    from metal_guard.cli import EXIT_GATE_BROKEN
    from metal_guard.status import snapshot_health

    code, label = snapshot_health(snap)
    errors = snap.get("errors")
    if not isinstance(snap.get("panic_cooldown"), dict) and isinstance(errors, dict) \
            and "panic_cooldown" in errors:
        return EXIT_GATE_BROKEN, "GATE BROKEN"
    return code, label


def _cmd_status(args: argparse.Namespace) -> int:
    from metal_guard.status import get_status_snapshot

    if args.lines < 0:
        print("metal-guard status: -n must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    snap = get_status_snapshot(breadcrumb_lines=args.lines)
    code, label = health(snap)
    fmt = "json" if args.json else args.format
    if fmt == "prometheus":
        from metal_guard.status_prom import render_prometheus

        sys.stdout.write(render_prometheus(snap))
    elif fmt == "json":
        args.json = True
        snap["health"] = {"exit_code": code, "label": label}
        emit(args, snap, "")
    else:
        print(_render_text(snap, code, label))
    return code


def _cmd_status_write(args: argparse.Namespace) -> int:
    from metal_guard.status import run_status_writer

    if args.interval is not None and args.interval <= 0:
        print("metal-guard status-write: --interval must be > 0", file=sys.stderr)
        return EXIT_USAGE
    code = run_status_writer(args.out, interval=args.interval, once=args.once,
                             prometheus=not args.no_prom)
    if args.once and code == EXIT_OK:
        from pathlib import Path

        from metal_guard.settings import get_settings
        from metal_guard.status import prom_path_for

        path = Path(args.out).expanduser() if args.out else get_settings().resolved_status_path
        emit(args, {"path": str(path), "prom_path": None if args.no_prom else str(prom_path_for(path))},
             str(path))
    return code if code in (EXIT_OK, EXIT_FAILED) else EXIT_FAILED


def _cmd_breadcrumb(args: argparse.Namespace) -> int:
    from metal_guard.breadcrumbs import parse_line, read_lines
    from metal_guard.settings import get_settings

    if args.lines < 0:
        print("metal-guard breadcrumb: -n must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    path = get_settings().resolved_breadcrumb_path
    lines = read_lines(args.lines if not args.tag else max(args.lines * 20, 2000), path=path)
    if args.tag:
        wanted = args.tag.upper()
        lines = [ln for ln in lines if (c := parse_line(ln)) is not None and c.tag == wanted]
        lines = lines[-args.lines:] if args.lines else []
    emit(args, {"path": str(path), "lines": lines},
         "\n".join(lines) if lines else f"(no breadcrumbs in {path})")
    return EXIT_OK


def _cmd_mode(args: argparse.Namespace) -> int:
    from metal_guard.settings import get_settings
    from metal_guard.status import COLLECTORS

    info = COLLECTORS["mode"]({"settings": get_settings()})  # the snapshot's own collector
    emit(args, info, f"{info['current']}: {info['description']} "
                     f"(set {info['env_var']}=defensive|observer)")
    return EXIT_OK


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "status",
                    help="health snapshot (default command); exits with the worst health: "
                         "0 ok, 1 warn, 2 cooldown, 3 gate broken")
    p.add_argument("--format", choices=("text", "json", "prometheus"), default="text")
    p.add_argument("-n", "--lines", type=int, default=20, help="breadcrumb lines to include")
    p.set_defaults(func=_cmd_status)

    p = add_command(subparsers, "status-write",
                    help="write status.json (+ status.prom) once or every --interval seconds")
    p.add_argument("--out", default=None, help="snapshot path (default: <cache>/status.json)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--once", action="store_true", help="write one snapshot and exit")
    group.add_argument("--interval", type=float, default=None, metavar="N",
                       help="seconds between snapshots (default METALGUARD_STATUS_INTERVAL_SEC=30)")
    p.add_argument("--no-prom", action="store_true", help="do not write the .prom textfile")
    p.set_defaults(func=_cmd_status_write)

    p = add_command(subparsers, "breadcrumb", help="tail the breadcrumb log")
    p.add_argument("-n", "--lines", type=int, default=20)
    p.add_argument("--tag", default=None, help="only lines with this TAG")
    p.set_defaults(func=_cmd_breadcrumb)

    p = add_command(subparsers, "mode", help="show the guard mode (defensive / observer)")
    p.set_defaults(func=_cmd_mode)
