"""Forensics subcommands: ``panic-gate``, ``ack``, ``panics``, ``postmortem``, ``orphan-scan``.

``panic-gate`` is what launchd wrappers run before MLX work; this module (and everything the
gate path imports) stays stdlib-only at import time and never imports ``mlx``.

Exit codes (see :data:`metal_guard.cli.EXIT_CODES`): ``panic-gate`` 0 proceed / 2 cooldown or
lockout / 3 gate broken; ``panics`` 1 when GPU panics are in the window, 3 when it found none
but could not see the whole window; ``postmortem`` 1 when it found a GPU panic; ``orphan-scan``
1 when a live (or unidentified) orphan exists; 4 when a command failed (I/O).

Report file names and directory paths are hostile text: everything printed goes through
:func:`shown` (control characters and undecodable bytes escaped) and :func:`_for_stdout` (any
character the terminal's encoding lacks is escaped), so no name can forge an output line or
crash the command.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime
from typing import Any

from metal_guard.cli import (
    EXIT_FAILED,
    EXIT_GATE_BROKEN,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_WARN,
    add_command,
    emit,
)

_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def shown(text: object) -> str:
    """``text`` with undecodable bytes as ``\\xNN`` and control / bidi characters escaped."""
    value = str(text)
    try:
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeError:  # a lone surrogate that is not an escaped byte
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL_RE.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), value)


def _for_stdout(text: str) -> str:
    """Escape what the stdout encoding cannot represent (a strict ASCII/UTF-8 stdout never fails)."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        return text.encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:
        return text.encode("ascii", "backslashreplace").decode("ascii")


def shown_lines(text: str) -> str:
    """:func:`shown` applied line by line (keeps our own line breaks)."""
    return "\n".join(shown(line) for line in text.split("\n"))


def _fmt_ts(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# --------------------------------------------------------------------------- panic-gate


_LABELS = {"proceed": "PROCEED", "disabled": "PROCEED (gate disabled)", "acked": "PROCEED (acked)",
           "cooldown": "COOLDOWN", "lockout": "LOCKOUT", "broken": "GATE BROKEN"}


def _cmd_gate(args: argparse.Namespace) -> int:
    from metal_guard.forensics.gate import evaluate_panic_cooldown

    verdict = evaluate_panic_cooldown()
    payload = verdict.to_dict(include_records=args.verbose)
    text = f"{_LABELS.get(verdict.state, verdict.state.upper())}: {verdict.reason}"
    if verdict.state in ("cooldown", "lockout"):
        text += f"\n  until {_fmt_ts(verdict.cooldown_until)} ({verdict.remaining_sec / 60:.0f} min)"
    if args.verbose:
        text += (f"\n  GPU panics 24h/72h: {verdict.recent_panics_24h}/{verdict.recent_panics_72h};"
                 f" GPU aborts 24h: {verdict.abort_count_24h}")
        for p in verdict.panics:
            text += f"\n  {_fmt_ts(p.timestamp)} {p.signature or '?'} {shown(p.path)}"
    text = shown_lines(text)
    if args.json or verdict.exit_code == 0:
        emit(args, payload, _for_stdout(text))
    else:  # a refusal goes to stderr, where launchd's StandardErrorPath keeps it
        print(text, file=sys.stderr)
    return verdict.exit_code


# --------------------------------------------------------------------------- ack


def _cmd_ack(args: argparse.Namespace) -> int:
    from metal_guard.forensics import gate

    done: dict[str, Any] = {}
    try:
        if args.clear:
            done["ack_removed"] = gate.clear_panic_ack()
        else:
            done["ack_path"] = str(gate.ack_panic_lockout(note=args.note or ""))
        if args.clear_sentinel:
            done["sentinel_removed"] = gate.clear_panic_sentinel()
    except OSError as exc:
        print(f"metal-guard ack: cannot write state: {exc}", file=sys.stderr)
        return EXIT_FAILED
    verdict = gate.evaluate_panic_cooldown()
    done["verdict"] = verdict.to_dict()
    lines = []
    if "ack_path" in done:
        lines.append(f"acknowledged: panics up to now no longer hold a lockout ({done['ack_path']})")
    if "ack_removed" in done:
        lines.append("ack removed" if done["ack_removed"] else "no ack to remove")
    if "sentinel_removed" in done:
        lines.append("cooldown sentinel removed" if done["sentinel_removed"] else "no sentinel to remove")
    lines.append(f"gate now: {_LABELS.get(verdict.state, verdict.state)}: {verdict.reason}")
    if verdict.sentinel_until and not args.clear_sentinel:
        lines.append("note: a cooldown sentinel is still active; `metal-guard ack --clear-sentinel` "
                     "removes it")
    emit(args, done, "\n".join(lines))
    return EXIT_OK


# --------------------------------------------------------------------------- panics


def _cmd_panics(args: argparse.Namespace) -> int:
    import time

    from metal_guard.forensics.reports import scan_reports
    from metal_guard.settings import get_settings

    if not args.since_hours > 0 or args.since_hours > 24 * 365 * 10:
        print("metal-guard panics: --since-hours must be > 0 and at most ten years", file=sys.stderr)
        return EXIT_USAGE
    s = get_settings()
    since = time.time() - args.since_hours * 3600
    kinds = frozenset({"panic", "crash"}) if args.aborts else frozenset({"panic"})
    from metal_guard.forensics.scancache import CACHE_FILE

    result = scan_reports(s.report_dirs, panic_since_ts=since, crash_since_ts=since, kinds=kinds,
                          cache_path=s.cache_file(CACHE_FILE))
    records = [r for r in result.records if args.all or r.is_gpu]
    gpu = [r for r in result.panics if r.is_gpu]
    payload = {"since_hours": args.since_hours, "dirs": result.dirs, "errors": result.errors,
               "notes": result.notes, "complete": "panic" not in result.incomplete,
               "gpu_panic_count": len(gpu), "records": [r.to_dict() for r in records],
               "skipped_files": result.skipped}
    lines = [f"{len(gpu)} GPU kernel panic(s) in the last {args.since_hours:g} h"
             f" ({len(result.panics)} kernel panic report(s) in total)"]
    for r in records:
        tag = r.signature or r.error_class or ("other" if r.kind == "kernel_panic" else r.kind)
        lines.append(f"  {_fmt_ts(r.timestamp)}  {r.kind:<13} {'GPU' if r.is_gpu else '   '} "
                     f"{shown(tag):<24} {shown(r.path)}")
    if not args.all and len(result.records) > len(records):
        lines.append(f"  ({len(result.records) - len(records)} non-GPU report(s) hidden; --all shows them)")
    for note in result.notes:
        lines.append(f"  note: {shown(note)}")
    for err in result.errors:
        lines.append(f"  error: {shown(err)}")
    if result.errors and not gpu:
        lines.append("  the window could not be fully seen: no panic found does NOT mean none happened")
    emit(args, payload, _for_stdout("\n".join(lines)))
    if gpu:
        return EXIT_WARN
    return EXIT_GATE_BROKEN if result.errors else EXIT_OK


# --------------------------------------------------------------------------- postmortem


def _cmd_postmortem(args: argparse.Namespace) -> int:
    from metal_guard.forensics.postmortem import run_postmortem

    try:
        result = run_postmortem(args.output_dir, hours=args.hours)
    except (OSError, ValueError) as exc:
        print(f"metal-guard postmortem: {shown(exc)}", file=sys.stderr)
        return EXIT_FAILED
    if result["status"] == "disabled":
        emit(args, result, "postmortem disabled by METALGUARD_POSTMORTEM_DISABLED=1")
        return EXIT_OK
    text = (f"postmortem written to {result['output_dir']}: {result['panic_count']} GPU panic(s), "
            f"{result['abort_count']} GPU abort(s); see {result['index']}")
    if result["sentinel"]:
        text += f"\ncooldown sentinel until {result['sentinel_until']}"
    for name, err in result["errors"].items():
        text += f"\n  warning: {shown(name)}: {shown(err)}"
    emit(args, result, _for_stdout(shown_lines(text)))
    return EXIT_WARN if result["panic_count"] else EXIT_OK


# --------------------------------------------------------------------------- orphan-scan


def _cmd_orphans(args: argparse.Namespace) -> int:
    from metal_guard.forensics.orphans import GONE, kill_orphans, scan_orphan_subproc_pre
    from metal_guard.settings import get_settings

    if args.threshold_sec is not None and args.threshold_sec < 0:
        print("metal-guard orphan-scan: --threshold-sec must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    s = get_settings()
    if s.subproc_orphan_watch_disabled:
        emit(args, {"disabled": True, "orphans": []},
             "orphan scan disabled by METALGUARD_SUBPROC_ORPHAN_WATCH_DISABLED=1")
        return EXIT_OK
    orphans = scan_orphan_subproc_pre(threshold_sec=args.threshold_sec, settings=s)
    live = [o for o in orphans if o.status != GONE]
    payload: dict[str, Any] = {"orphans": [o.to_dict() for o in orphans], "live_count": len(live)}
    lines = [f"{len(orphans)} orphaned SUBPROC_PRE marker(s), {len(live)} not known to be gone"]
    for o in orphans:
        lines.append(f"  {o.model_id} since {_fmt_ts(o.pre_ts)} ({o.age_sec:.0f}s) "
                     f"pid={o.pid or '?'} {o.status}")
    if args.kill:
        killed = kill_orphans([o for o in live if o.status == "running"], grace_sec=args.grace_sec)
        payload["kill"] = killed
        for k in killed:
            lines.append(f"  kill {k['model_id']} pid={k['pid']}: {k['action']}")
    emit(args, payload, "\n".join(lines))
    return EXIT_WARN if live else EXIT_OK


# --------------------------------------------------------------------------- registration


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "panic-gate",
                    help="panic gate: may MLX work start? exit 0 proceed, 2 cooldown/lockout, 3 gate broken")
    p.add_argument("-v", "--verbose", action="store_true", help="list the panics behind the verdict")
    p.set_defaults(func=_cmd_gate)

    p = add_command(subparsers, "ack", help="acknowledge panics so far and clear a panic-gate lockout")
    p.add_argument("--note", default="", help="free text stored with the ack")
    p.add_argument("--clear", action="store_true", help="remove the ack instead of writing it")
    p.add_argument("--clear-sentinel", action="store_true",
                   help="also remove the cooldown sentinel (written by postmortem)")
    p.set_defaults(func=_cmd_ack)

    p = add_command(subparsers, "panics", help="list kernel panic (and --aborts crash) reports")
    p.add_argument("--since-hours", type=float, default=72.0, metavar="H")
    # exit: 0 none, 1 GPU panics in the window, 3 none found but the window was not fully seen
    p.add_argument("--all", action="store_true", help="include non-GPU reports")
    p.add_argument("--aborts", action="store_true", help="include .ips process-crash reports")
    p.set_defaults(func=_cmd_panics)

    p = add_command(subparsers, "postmortem", help="collect a postmortem bundle (panic reports, breadcrumbs, versions) into OUTPUT_DIR")
    p.add_argument("output_dir", metavar="OUTPUT_DIR")
    p.add_argument("--hours", type=float, default=24.0, help="look back this far (default 24)")
    p.set_defaults(func=_cmd_postmortem)

    p = add_command(subparsers, "orphan-scan",
                    help="find orphaned worker starts: SUBPROC_PRE without SUBPROC_POST (exit 1 when found)")
    p.add_argument("--threshold-sec", type=float, default=None, metavar="N")
    p.add_argument("--kill", action="store_true",
                   help="SIGTERM/SIGKILL live orphans whose pid still has the recorded create_time")
    p.add_argument("--grace-sec", type=float, default=5.0, help="SIGTERM grace before SIGKILL")
    p.set_defaults(func=_cmd_orphans)
