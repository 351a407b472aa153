"""``metal-guard demo``: run the guarded multi-model pipeline on tiny local models.

Text mode prints each step as it finishes, then a status report; ``--json`` prints one JSON
document (steps, the demo's settings and the full status snapshot). Exit code 0 when every step
passed, 2 when a panic cooldown / breaker refused the work, 4 when a step failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from metal_guard.cli import EXIT_COOLDOWN, EXIT_FAILED, EXIT_OK, add_command


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(subparsers, "demo",
                    help="run a guarded two-model pipeline on tiny local models (about 5 s once cached, offline)")
    p.add_argument("--max-tokens", type=int, default=12, metavar="N",
                   help="tokens per generation (default: 12)")
    p.add_argument("--keep-home", action="store_true",
                   help="keep the demo's throw-away state directory (printed at the end)")
    p.add_argument("--home", metavar="DIR",
                   help="use DIR as the demo's state directory instead of a temporary one (kept)")
    p.set_defaults(func=run)


def _mb(value: Any) -> str:
    return f"{value / 1e6:.2f} MB" if isinstance(value, (int, float)) else "n/a"


def _echo(step: Any, index: int, total: int) -> None:
    mark = "ok" if step.ok else "FAILED"
    print(f"  [{index}/{total}] {step.title:<32} {mark:<6} {step.elapsed_sec:6.2f} s  {step.summary}",
          flush=True)


def _crumb_line(line: str) -> str:
    from metal_guard.breadcrumbs import parse_line

    crumb = parse_line(line)
    if crumb is None:
        return line[:140]
    when = crumb.ts.strftime("%H:%M:%S") if isinstance(crumb.ts, datetime) else "?"
    shown = ("model", "pid", "phase", "signal", "error_class", "elapsed_sec", "respawn")
    meta = " ".join(f"{k}={_short(v)}" for k, v in crumb.meta.items() if k in shown)
    return f"{when} {crumb.tag}: {_short(crumb.payload)} {meta}".strip()[:140]


def _short(value: Any) -> str:
    """Model paths as their last component (the demo's paths are long)."""
    text = str(value)
    return " ".join(part.rsplit("/", 1)[-1] if part.count("/") > 1 else part for part in text.split(" "))


def report(result: Any) -> str:
    """The human-readable status report printed after the steps."""
    snap = result.status or {}
    lines = ["", "Status report (the demo's own state; your real state was not touched)"]
    health = snap.get("health") or {}
    lines.append(f"  health       {health.get('label', 'n/a')}")
    mem = snap.get("memory") or {}
    if mem.get("available"):
        lines.append(f"  memory       active {_mb(mem.get('active_bytes'))}, peak {_mb(mem.get('peak_bytes'))}"
                     f" across {mem.get('process_count')} guarded process(es)")
    cad = snap.get("cadence") or {}
    loads = cad.get("last_loads") or {}
    lines.append(f"  cadence      {len(loads)} model(s) recorded; demo intervals: same model "
                 f"{result.settings['cadence_min_interval_sec']:g} s, cross-model "
                 f"{result.settings['cross_model_interval_sec']:g} s (defaults 180 s / 0 s)")
    brk = snap.get("breaker") or {}
    lines.append(f"  breaker      {brk.get('state', 'n/a')}: {brk.get('recent_crash_count', 0)} worker crash(es) "
                 f"in the window, trips at {brk.get('panic_threshold', '?')}")
    res = (snap.get("resources") or {}).get("this_process") or {}
    lines.append(f"  inferences   {res.get('current_count', 'n/a')} guarded generation(s) in this process")
    gate = snap.get("panic_cooldown") or {}
    lines.append(f"  panic gate   {gate.get('state', 'n/a')} ({gate.get('reason', '')})")
    crumbs = snap.get("breadcrumb_tail") or []
    if crumbs:
        lines.append(f"  breadcrumbs  last {len(crumbs)}:")
        lines.extend(f"    {_crumb_line(c)}" for c in crumbs)
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    """The demo reports the deliberate crash itself: keep the library's warning about it out
    of the step list, unless logging is configured (``METALGUARD_DEBUG=1`` or a handler)."""
    from metal_guard.settings import get_settings

    logger = logging.getLogger("metal_guard")
    if logging.getLogger().handlers or logger.handlers or get_settings().debug:
        yield
        return
    handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def run(args: argparse.Namespace) -> int:
    from metal_guard.demo import DEMO_CADENCE_SEC, DEMO_CROSS_MODEL_SEC, run_demo

    if args.max_tokens < 1:
        print("metal-guard demo: --max-tokens must be >= 1", file=sys.stderr)
        from metal_guard.cli import EXIT_USAGE

        return EXIT_USAGE
    if not args.json:
        print("metal-guard demo: a guarded two-model pipeline on tiny local models "
              f"(random weights, offline; demo cadence {DEMO_CADENCE_SEC:g} s / "
              f"cross-model {DEMO_CROSS_MODEL_SEC:g} s)", flush=True)
    with _quiet_warnings():
        result = run_demo(max_tokens=args.max_tokens, home=args.home, keep_home=args.keep_home,
                          echo=None if args.json else _echo)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True, default=str))
    else:
        if result.status is not None:
            print(report(result))
        if result.error:
            print(f"\ndemo stopped: {result.error}", file=sys.stderr)
        where = f"; state kept in {result.home}" if result.home_kept else ""
        print(f"\n{'Done' if result.ok else 'Failed'} in {result.wall_sec:.1f} s{where}. "
              "Protect your own code: metal_guard.install(), or `metal-guard run -- <command>`.")
    if result.exit_code == 2:
        return EXIT_COOLDOWN
    return EXIT_OK if result.ok else EXIT_FAILED
