"""``metal-guard cadence [status | reset MODEL | reset --all]``: show and clear L9 cadence entries.

``status`` lists every recorded load with its age, the process (and rank) that made it, the
interval that applies to that model now and why, and how long a new load would wait.
``reset MODEL`` forgets one model's last load (the next load of it is not refused);
``reset --all`` forgets every entry. Nothing here imports MLX.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from metal_guard.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_command, emit


def _guard() -> Any:
    from metal_guard.cadence import CadenceGuard

    return CadenceGuard()


def _rule(guard: Any) -> str:
    same = ("risk-scaled per model (METALGUARD_CADENCE_MIN_INTERVAL_SEC unset)"
            if guard.min_interval_sec is None else f"{guard.min_interval_sec:g}s for every model")
    return (f"same-model interval: {same}; cross-model: {guard.cross_model_interval_sec:g}s "
            "(gemma-4 models: at least 90s)")


def status_payload(guard: Any = None, *, now: float | None = None) -> dict[str, Any]:
    """Entries with age, recorder, current interval (and reason) and remaining wait."""
    guard = guard or _guard()
    at = time.time() if now is None else now
    rows = []
    for model, rec in sorted(guard.records().items(), key=lambda kv: -kv[1]["ts"]):
        try:
            interval = guard.interval_for(model)
            info: dict[str, Any] = interval.as_dict()
            wait = guard.seconds_until_clear(model, now=at)
        except Exception as exc:  # one odd entry must not hide the others
            info, wait = {"seconds": None, "reason": f"{type(exc).__name__}: {exc}"}, None
        rows.append({"model": model, "loaded_ago_sec": round(max(0.0, at - rec["ts"]), 1),
                     "record": rec, "interval": info, "wait_sec": wait})
    return {"path": str(guard.path), "min_interval_sec": guard.min_interval_sec,
            "cross_model_interval_sec": guard.cross_model_interval_sec,
            "rule": _rule(guard), "entries": rows}


def _render(payload: dict[str, Any]) -> str:
    lines = [f"cadence ({payload['path']})", f"  {payload['rule']}"]
    if not payload["entries"]:
        lines.append("  no recent loads recorded")
    for row in payload["entries"]:
        rec, interval = row["record"], row["interval"]
        by = f"pid {rec['pid']}" if "pid" in rec else "unknown process"
        if rec.get("cmd"):
            by += f" ({rec['cmd']})"
        if "ranks" in rec:
            by += f", rank(s) {','.join(map(str, rec['ranks']))}"
        seconds = interval.get("seconds")
        need = "?" if seconds is None else f"{seconds:g}s"
        wait = row["wait_sec"]
        state = "clear" if wait == 0 else ("?" if wait is None else f"wait {wait:.0f}s")
        lines.append(f"  {row['model']}: loaded {row['loaded_ago_sec']:.0f}s ago by {by}; "
                     f"interval {need} ({interval.get('source', '?')}); {state}")
        if interval.get("reason"):
            lines.append(f"      because {interval['reason']}")
    lines.append("  relax: METALGUARD_CADENCE_MIN_INTERVAL_SEC=<seconds> (0 = off) or "
                 "`metal-guard cadence reset MODEL`")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    guard = _guard()
    if args.action == "status":
        if args.model or args.all:
            print("metal-guard cadence: status takes no MODEL or --all")
            return EXIT_USAGE
        payload = status_payload(guard)
        emit(args, payload, _render(payload))
        return EXIT_OK
    if args.all == bool(args.model):
        print("metal-guard cadence: reset needs a MODEL or --all (not both)")
        return EXIT_USAGE
    if args.all:
        found = guard.reset()
        emit(args, {"reset": "all", "found": found}, "cadence: every entry forgotten"
             if found else "cadence: nothing was recorded")
        return EXIT_OK
    model = args.model.strip()
    if not model:
        print("metal-guard cadence: MODEL must not be empty")
        return EXIT_USAGE
    found = guard.reset(model)
    if not found:
        known = ", ".join(sorted(guard.records())) or "none"
        emit(args, {"reset": model, "found": False, "recorded": sorted(guard.records())},
             f"cadence: no entry for {model!r} (recorded: {known})")
        return EXIT_FAILED
    emit(args, {"reset": model, "found": True},
         f"cadence: forgot the last load of {model!r}; its next load is not refused by cadence")
    return EXIT_OK


def register(subparsers: Any) -> None:
    cmd = add_command(subparsers, "cadence",
                      help="show (status) or clear (reset MODEL | reset --all) the load cadence entries")
    cmd.add_argument("action", nargs="?", choices=("status", "reset"), default="status")
    cmd.add_argument("model", nargs="?", default=None, help="the model id or path to forget")
    cmd.add_argument("--all", action="store_true", help="with reset: forget every entry")
    cmd.set_defaults(func=_run)
