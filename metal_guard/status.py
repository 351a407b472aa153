"""L13: the status snapshot, its writer daemon, and the memory heartbeats it reads.

``status.json`` (schema :data:`STATUS_SNAPSHOT_SCHEMA_VERSION`, JSON Schema shipped as
``metal_guard/data/status_schema.json``) is for menu-bar apps, dashboards and ssh scripts that
should not import metal-guard. Next to it, ``status.prom`` is a node-exporter textfile.

**The writer never imports MLX** (the reference's did, initialising Metal every 30 s). Memory
figures come from *heartbeats*: every guarded process calls :func:`publish_memory` with its
own counters, which writes ``<cache>/heartbeats/<pid>.json``; :func:`read_published_memory`
collects them and drops processes that are gone. If the calling process has already imported
MLX itself, its counters are read through :func:`metal_guard.backend.loaded_core` (no import).

Each collector runs in its own ``try``; a failure is recorded in ``errors[collector]`` and the
rest of the snapshot is still written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from metal_guard._version import __version__
from metal_guard.clock import now_ts as _now_ts
from metal_guard.clock import utc_iso as _iso
from metal_guard.heartbeat import (
    clear_published_memory,
    publish_memory,
    read_published_memory,
    to_jsonable,
)
from metal_guard.migrate import ensure_imported as ensure_legacy_imported
from metal_guard.settings import settings_or_current as _settings

log = logging.getLogger("metal_guard.status")

__all__ = [
    "STATUS_SNAPSHOT_SCHEMA_VERSION",
    "clear_published_memory",
    "get_status_snapshot",
    "prom_path_for",
    "publish_memory",
    "read_published_memory",
    "run_status_writer",
    "snapshot_health",
    "status_schema",
    "write_status_snapshot",
]

#: Bumped on breaking changes; minor versions only add keys.
STATUS_SNAPSHOT_SCHEMA_VERSION = "2.0"
GB = 1_000_000_000


# --------------------------------------------------------------------------- collectors


def _memory(ctx: dict[str, Any]) -> dict[str, Any]:
    from metal_guard import backend

    procs = read_published_memory(now=ctx["now"], prune=ctx["prune"], settings=ctx["settings"])
    own = backend.memory_counters(load=False)  # only if this process already imported MLX
    if own is not None and not any(p.get("pid") == os.getpid() for p in procs):
        procs.insert(0, {"pid": os.getpid(), "label": "this process", "age_sec": 0.0,
                         "stale": False, "memory": dataclasses.asdict(own)})
    ctx["heartbeats"] = procs
    fresh = [p for p in procs if not p.get("stale")]
    if not fresh:
        reason = "no guarded process has published memory" if not procs else "heartbeats are stale"
        return {"available": False, "reason": reason, "source": "heartbeats", "processes": procs}

    def total(key: str) -> int | None:
        vals = [p["memory"][key] for p in fresh if isinstance(p.get("memory", {}).get(key), int)]
        return sum(vals) if vals else None

    active, cache = total("active_bytes"), total("cache_bytes")
    peaks = [p["memory"]["peak_bytes"] for p in fresh if isinstance(p["memory"].get("peak_bytes"), int)]
    limits = [p["memory"]["limit_bytes"] for p in fresh if isinstance(p["memory"].get("limit_bytes"), int)]
    peak, limit = (max(peaks) if peaks else None), (max(limits) if limits else None)

    def gb(v: int | None) -> float | None:
        return None if v is None else round(v / GB, 3)

    def pct(v: int | None) -> float | None:
        return None if v is None or not limit else round(100.0 * v / limit, 2)

    return {"available": True, "source": "heartbeats", "process_count": len(fresh),
            "active_bytes": active, "cache_bytes": cache, "peak_bytes": peak, "limit_bytes": limit,
            "active_gb": gb(active), "peak_gb": gb(peak), "limit_gb": gb(limit),
            "available_gb": gb(limit - active) if limit and active is not None else None,
            "active_pct": pct(active), "peak_pct": pct(peak), "processes": procs}


def _lock(ctx: dict[str, Any]) -> dict[str, Any]:
    from metal_guard.lock import read_mlx_lock

    holder = read_mlx_lock()
    if not holder:
        return {"held": False}
    info = to_jsonable(holder.as_dict())
    info["held"] = True
    if isinstance(info.get("cmdline"), str):
        info["cmdline"] = info["cmdline"][:500]
    return info  # type: ignore[no-any-return]


def _mode(ctx: dict[str, Any]) -> dict[str, Any]:
    s = ctx["settings"]
    out: dict[str, Any] = {"current": s.mode, "env_var": "METALGUARD_MODE",
                           "description": ("refuses unsafe operations and cleans up" if s.is_defensive
                                           else "records and lets calls through")}
    try:
        from metal_guard import mode as mode_mod

        describe = getattr(mode_mod, "describe_mode", None)
        if callable(describe):
            out["details"] = to_jsonable(describe())
    except ImportError:
        pass
    return out


def _gate(ctx: dict[str, Any]) -> dict[str, Any]:
    from metal_guard.forensics.gate import evaluate_panic_cooldown

    verdict = evaluate_panic_cooldown(now=ctx["now"], settings=ctx["settings"])
    ctx["verdict"] = verdict
    return verdict.to_dict()


def _reports(ctx: dict[str, Any]) -> dict[str, Any]:
    from metal_guard.forensics.reports import scan_reports

    now = ctx["now"]
    from metal_guard.forensics.scancache import CACHE_FILE

    s = ctx["settings"]
    result = scan_reports(s.report_dirs, panic_since_ts=now - 72 * 3600,
                          crash_since_ts=now - 24 * 3600, now=now, cache_path=s.cache_file(CACHE_FILE))
    ctx["recent_panics"] = [r.to_dict() for r in result.panics][:50]
    ctx["recent_aborts"] = [r.to_dict() for r in result.crashes if r.is_gpu][:50]
    return {"errors": result.errors}


def _breaker(ctx: dict[str, Any]) -> dict[str, Any]:
    from metal_guard.breaker import CircuitBreaker

    return to_jsonable(CircuitBreaker(auto_ingest=False).status(now=ctx["now"]))  # type: ignore[no-any-return]


def _cadence(ctx: dict[str, Any]) -> dict[str, Any]:
    from metal_guard.cadence import CadenceGuard

    guard = CadenceGuard()
    records = guard.records()
    return {"min_interval_sec": guard.min_interval_sec,  # None: risk-scaled per model
            "interval_rule": "risk-scaled" if guard.min_interval_sec is None else "fixed",
            "cross_model_interval_sec": guard.cross_model_interval_sec,
            "last_loads": {k: _iso(r["ts"]) for k, r in records.items()},
            "last_load_ranks": {k: r["ranks"] for k, r in records.items() if "ranks" in r}}


def _resources(ctx: dict[str, Any]) -> dict[str, Any]:
    per_process = [{"pid": p.get("pid"), **p["extra"]["resources"]} for p in ctx.get("heartbeats", [])
                   if isinstance(p.get("extra"), dict) and isinstance(p["extra"].get("resources"), dict)]
    out: dict[str, Any] = {"processes": per_process}
    try:
        from metal_guard import resources

        tracker = getattr(resources, "global_resource_tracker", None)
        if callable(tracker):
            out["this_process"] = to_jsonable(tracker().snapshot())
    except ImportError:
        pass
    return out


def _gpu(ctx: dict[str, Any]) -> dict[str, Any]:
    from metal_guard import hardware

    for proc in ctx.get("heartbeats", []):
        if isinstance(proc.get("device"), dict) and proc["device"]:
            info = hardware.apple_gpu_family(dict(proc["device"]))
            info["source"] = f"heartbeat pid {proc.get('pid')}"
            return info
    info = hardware.apple_gpu_family(load=False)
    info["source"] = "this process" if info.get("available") else "unavailable"
    return info


_ADVISORY_FUNCS = ("metal_guard.knowledge.advisories:check_version_advisories",
                   "metal_guard.knowledge:check_version_advisories",
                   "metal_guard.advisories:check_version_advisories")


def _advisories(ctx: dict[str, Any]) -> list[Any]:
    import importlib

    for spec in _ADVISORY_FUNCS:
        mod_name, func_name = spec.split(":")
        try:
            func = getattr(importlib.import_module(mod_name), func_name, None)
        except ImportError:
            continue
        if callable(func):
            return list(to_jsonable(list(func())))
    raise LookupError("version advisories are not available in this install")


def _breadcrumbs(ctx: dict[str, Any]) -> list[str]:
    from metal_guard.breadcrumbs import read_lines

    return read_lines(ctx["breadcrumb_lines"]) if ctx["breadcrumb_lines"] > 0 else []


#: name -> collector, in run order (memory first: later collectors use its heartbeats).
COLLECTORS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "memory": _memory, "lock": _lock, "mode": _mode, "panic_cooldown": _gate,
    "reports": _reports, "breaker": _breaker, "cadence": _cadence, "resources": _resources,
    "gpu": _gpu, "advisories": _advisories, "breadcrumb_tail": _breadcrumbs,
}


def get_status_snapshot(
    *, include_panics: bool = True, breadcrumb_lines: int = 20,
    now: datetime | float | None = None, settings: Any = None, prune: bool = False,
) -> dict[str, Any]:
    """Collect the snapshot (a JSON-able dict; see ``docs/forensics.md``). Never imports MLX."""
    s = _settings(settings)
    ensure_legacy_imported(s)  # show a metal-guard 0.11 cooldown/breaker carried over (migrate.py)
    now_ts = _now_ts(now)
    ctx: dict[str, Any] = {"settings": s, "now": now_ts, "prune": prune,
                           "breadcrumb_lines": max(0, int(breadcrumb_lines))}
    snap: dict[str, Any] = {
        "schema_version": STATUS_SNAPSHOT_SCHEMA_VERSION, "captured_at": _iso(now_ts),
        "captured_at_ts": now_ts, "host": socket.gethostname(), "metal_guard_version": __version__,
        "writer": {"pid": os.getpid(), "mlx_imported": "mlx.core" in sys.modules},
        "breadcrumb_path": str(s.resolved_breadcrumb_path),
    }
    errors: dict[str, str] = {}
    for name, collect in COLLECTORS.items():
        if name == "reports" and not include_panics:
            continue
        try:
            value = collect(ctx)
        except Exception as exc:
            log.debug("status collector %s failed", name, exc_info=True)
            errors[name] = f"{type(exc).__name__}: {exc}"[:200]
            value = None
        if name == "reports":
            for err in (value or {}).get("errors", []):
                errors.setdefault("reports", err[:200])
            continue
        snap[name] = value
    snap["recent_panics"] = ctx.get("recent_panics", [])
    snap["recent_aborts"] = ctx.get("recent_aborts", [])
    snap["errors"] = errors
    return snap


def snapshot_health(snap: Mapping[str, Any]) -> tuple[int, str]:
    """``(exit_code, label)``: 0 ok, 1 warn (GPU panics/aborts, open breaker, collector
    errors, or — in a guarded server's snapshot — the server cannot serve: label
    ``SERVER NOT READY (<reason>)``), 2 cooldown/lockout active, 3 gate broken. Tolerates any
    JSON shape."""

    def m(value: Any) -> Mapping[str, Any]:
        return value if isinstance(value, Mapping) else {}

    snap = m(snap)
    gate = m(snap.get("panic_cooldown"))
    code = gate.get("exit_code")
    if code == 2:
        return 2, str(gate.get("state") or "cooldown").upper()
    if code == 3:
        return 3, "GATE BROKEN"
    server = m(snap.get("server"))
    if server.get("ready") is False:
        reason = "".join(c for c in str(server.get("not_ready_reason") or "unknown")[:60] if c.isprintable())
        return 1, f"SERVER NOT READY ({reason})"
    panics = snap.get("recent_panics")
    gpu_panic = isinstance(panics, list) and any(m(p).get("is_gpu") for p in panics)
    if gpu_panic or snap.get("recent_aborts") or m(snap.get("breaker")).get("in_cooldown") \
            or snap.get("errors"):
        return 1, "WARN"
    return 0, "OK"


# --------------------------------------------------------------------------- writing


def status_schema() -> dict[str, Any]:
    """The packaged JSON Schema of the snapshot."""
    import json
    from importlib import resources

    text = (resources.files("metal_guard") / "data" / "status_schema.json").read_text("utf-8")
    return json.loads(text)  # type: ignore[no-any-return]


def prom_path_for(status_path: Path) -> Path:
    """``status.json`` -> ``status.prom`` (node-exporter textfile next to it)."""
    return Path(status_path).with_suffix(".prom")


def write_status_snapshot(
    out_path: Path | str | None = None, *, snapshot: dict[str, Any] | None = None,
    prometheus: bool = True, now: datetime | float | None = None, settings: Any = None,
) -> Path:
    """Collect (unless given) and atomically write the snapshot, plus ``.prom`` next to it."""
    import json

    from metal_guard import storage
    from metal_guard.status_prom import render_prometheus

    s = _settings(settings)
    path = Path(out_path).expanduser() if out_path is not None else s.resolved_status_path
    snap = snapshot if snapshot is not None else get_status_snapshot(now=now, settings=s, prune=True)
    text = json.dumps(snap, indent=2, sort_keys=True, default=str) + "\n"
    storage.write_text_atomic(path, text)
    if prometheus:
        storage.write_text_atomic(prom_path_for(path), render_prometheus(snap))
    return path


def run_status_writer(
    out_path: Path | str | None = None, *, interval: float | None = None, once: bool = False,
    stop: threading.Event | None = None, max_errors: int = 10, prometheus: bool = True,
    install_signal_handlers: bool = True,
) -> int:
    """Write the snapshot once, or every ``interval`` seconds until SIGTERM/SIGINT or ``stop``.

    Returns 0 after a clean stop (or a successful ``once``), 4 when ``once`` fails. After
    ``max_errors`` consecutive failures the daemon backs off to 5x the interval.
    """
    import signal

    s = _settings()
    period = float(interval if interval is not None else s.status_interval_sec)
    if period <= 0:
        raise ValueError("interval must be > 0")
    if once:
        try:
            write_status_snapshot(out_path, prometheus=prometheus, settings=s)
            return 0
        except Exception as exc:
            log.error("status write failed: %s", exc)
            return 4
    stop = stop or threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if install_signal_handlers and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    failures = 0
    try:
        while not stop.is_set():
            try:
                write_status_snapshot(out_path, prometheus=prometheus, settings=s)
                failures = 0
            except Exception as exc:
                failures += 1
                log.warning("status write failed (%d in a row): %s", failures, exc)
            wait = period * 5 if failures >= max_errors else period
            stop.wait(wait)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
