"""Prometheus text exposition of a status snapshot (no ``prometheus_client`` needed).

:func:`render_prometheus` turns a snapshot dict (from :func:`metal_guard.status.get_status_snapshot`
or read back from ``status.json``) into the text format 0.0.4 that node-exporter's textfile
collector and any scraper read. Missing sections simply produce fewer metrics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["render_prometheus"]

_GATE_STATES = ("proceed", "cooldown", "lockout", "acked", "disabled", "broken")


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _fmt(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.declared: set[str] = set()

    def metric(self, name: str, help_: str, samples: Iterable[tuple[Mapping[str, Any], Any]],
               kind: str = "gauge") -> None:
        rows = [(labels, _num(v)) for labels, v in samples]
        rows = [(labels, v) for labels, v in rows if v is not None]
        if not rows:
            return
        full = "metal_guard_" + name
        if full not in self.declared:
            self.lines.append(f"# HELP {full} {help_}")
            self.lines.append(f"# TYPE {full} {kind}")
            self.declared.add(full)
        for labels, value in rows:
            assert value is not None
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            self.lines.append(f"{full}{{{label_text}}} {_fmt(value)}" if label_text
                              else f"{full} {_fmt(value)}")

    def one(self, name: str, help_: str, value: Any, **labels: Any) -> None:
        self.metric(name, help_, [(labels, value)])


def _m(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def render_prometheus(snap: Mapping[str, Any]) -> str:
    """Render ``snap`` as Prometheus text (ends with a newline). Tolerates any JSON shape
    (e.g. a ``status.json`` of another schema version): unknown parts give fewer metrics."""
    from metal_guard.status import snapshot_health

    snap = _m(snap)
    out = _Out()
    mode = _m(snap.get("mode")).get("current", "unknown")
    gpu = _m(snap.get("gpu"))
    out.one("info", "metal-guard version, mode and GPU family (value is always 1).", 1,
            version=snap.get("metal_guard_version", "unknown"), mode=mode,
            schema_version=snap.get("schema_version", ""), gpu_family=gpu.get("family", "unknown"))
    out.one("snapshot_timestamp_seconds", "When the snapshot was taken (Unix time).",
            snap.get("captured_at_ts"))
    health, _label = snapshot_health(snap)
    out.one("health_exit_code", "Exit code `metal-guard status` would return (0 ok, 1 warn, "
            "2 cooldown, 3 gate broken); a guarded server's own /metrics counts the server being "
            "unable to serve as 1.", health)
    gate = _m(snap.get("panic_cooldown"))
    out.one("panic_gate_exit_code", "Panic gate verdict: 0 proceed, 2 cooldown/lockout, 3 broken.",
            gate.get("exit_code"))
    if isinstance(gate.get("state"), str):
        out.metric("panic_gate_state", "Panic gate state (1 for the current state).",
                   [({"state": st}, gate.get("state") == st) for st in _GATE_STATES])
    out.one("panic_cooldown_remaining_seconds", "Seconds until the cooldown/lockout may end.",
            gate.get("remaining_sec"))
    out.one("gpu_kernel_panics_24h", "IOGPU kernel panics in the last 24 h.",
            gate.get("recent_panics_24h"))
    out.one("gpu_kernel_panics_72h", "IOGPU kernel panics in the last 72 h.",
            gate.get("recent_panics_72h"))
    out.one("gpu_process_aborts_24h", "GPU/Metal process aborts in the last 24 h.",
            gate.get("abort_count_24h"))
    panics = snap.get("recent_panics")
    if isinstance(panics, list):
        out.one("kernel_panics_72h", "All kernel panics (GPU or not) in the last 72 h.", len(panics))
    lock = snap.get("lock")
    if isinstance(lock, Mapping):
        out.one("lock_held", "1 when the cross-process MLX lock is held.", bool(lock.get("held")))
    breaker = snap.get("breaker")
    if isinstance(breaker, Mapping):
        out.one("breaker_open", "1 while the circuit breaker refuses new workers.",
                bool(breaker.get("in_cooldown")))
    memory = snap.get("memory")
    if isinstance(memory, Mapping):
        out.one("memory_available", "1 when a guarded process published fresh memory figures.",
                bool(memory.get("available")))
        raw_procs = memory.get("processes")
        procs = [p for p in raw_procs if isinstance(p, Mapping)] if isinstance(raw_procs, list) else []
        def labels(p: Mapping[str, Any]) -> dict[str, Any]:
            out = {"pid": p.get("pid"), "label": p.get("label") or ""}
            if isinstance(p.get("rank"), int):  # a rank of a distributed job
                out.update(rank=p["rank"], world_size=p.get("world_size", ""))
            return out

        for key, help_ in (("active_bytes", "MLX active memory per guarded process."),
                           ("peak_bytes", "MLX peak memory per guarded process."),
                           ("cache_bytes", "MLX cache memory per guarded process."),
                           ("limit_bytes", "Memory budget per guarded process."),
                           ("footprint_bytes", "Process footprint per guarded process.")):
            out.metric("memory_" + key, help_,
                       [(labels(p), _m(p.get("memory")).get(key)) for p in procs])
        out.metric("heartbeat_age_seconds", "Age of each guarded process's memory heartbeat.",
                   [(labels(p), p.get("age_sec")) for p in procs])
    server = snap.get("server")
    if isinstance(server, Mapping):
        _server(out, server)
    errors = _m(snap.get("errors"))
    out.metric("collector_error", "1 for each snapshot collector that failed.",
               [({"collector": str(name)}, 1) for name in sorted(map(str, errors))])
    return "\n".join(out.lines) + "\n"


#: The ``server`` section of a guarded ``mlx_lm.server`` (its own ``/metrics``): key -> help.
_SERVER_GAUGES = {
    "ready": "1 while the server can take requests (loaded, or able to load on demand).",
    "model_loaded": "1 while a model is loaded (0 after a keep-alive unload).",
    "generation_up": "1 while the generation thread is alive.",
    "keep_alive_seconds": "Seconds an idle model stays loaded after the last request (-1 = forever).",
    "prompt_cache_bytes": "Bytes held by the prompt cache.",
    "prompt_cache_entries": "Entries in the prompt cache.",
    "in_flight_requests": "Completion requests being answered.",
}
_SERVER_GAUGE_KEYS = {"generation_up": "generation_alive", "keep_alive_seconds": "keep_alive_sec",
                      "in_flight_requests": "in_flight"}
_SERVER_MEMORY = {
    "active_bytes": "MLX active memory of this server process.",
    "cache_bytes": "MLX buffer-cache memory of this server process.",
    "peak_bytes": "MLX peak memory of this server process.",
}


def _server(out: _Out, server: Mapping[str, Any]) -> None:
    """``metal_guard_server_*``: label-free series, stable across restarts and model switches."""
    from metal_guard.adapters._server_state import COUNTERS

    for name, help_ in _SERVER_GAUGES.items():
        out.one("server_" + name, help_, server.get(_SERVER_GAUGE_KEYS.get(name, name)))
    for name, help_ in COUNTERS.items():
        metric = name if name.endswith("_total") else name + "_total"
        out.metric("server_" + metric, help_, [({}, server.get(name))], kind="counter")
    memory = _m(server.get("memory"))
    for name, help_ in _SERVER_MEMORY.items():
        out.one("server_memory_" + name, help_, memory.get(name))
