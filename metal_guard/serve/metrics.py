"""The pair's own answers: ``/health``, ``/metal-guard/status`` and ``/metrics``.

All three are answered by the front, also while the child is down. The status and the
metrics add the child's own ``/metal-guard/status`` / ``/metrics`` when it is up (fetched
with a short timeout; a child that does not answer is simply left out).
"""

from __future__ import annotations

import http.client
import json
import os
import sys
from typing import Any

__all__ = ["health", "metrics_text", "status_payload"]

CHILD_FETCH_TIMEOUT_SEC = 2.0
CHILD_FETCH_MAX_BYTES = 1 << 20
PREFIX = "metalguard_serve_"


def health(snap: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """HTTP status and body of ``GET /health``: 200 when ready, 503 when starting or down."""
    state = snap["state"]
    body = {"status": state, "reason": snap.get("reason"),
            "child_pid": (snap.get("active") or {}).get("pid"),
            "restarts": snap["restarts"], "standby_ready": bool((snap.get("standby") or {}).get("ready"))}
    return (200 if state == "ready" else 503), body


def _fetch(port: int, path: str) -> bytes | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CHILD_FETCH_TIMEOUT_SEC)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        data = resp.read(CHILD_FETCH_MAX_BYTES)
        return data if resp.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def front_facts(listen: tuple[str, int]) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": listen[0], "port": listen[1],
            "mlx_imported": any(m == "mlx" or m.startswith("mlx.") for m in list(sys.modules))}


def status_payload(snap: dict[str, Any], listen: tuple[str, int], breaker: dict[str, Any] | None,
                   child_port: int | None) -> dict[str, Any]:
    payload: dict[str, Any] = {"serve": snap, "front": front_facts(listen), "breaker": breaker,
                               "child": None}
    if child_port is not None:
        raw = _fetch(child_port, "/metal-guard/status")
        if raw is not None:
            try:
                payload["child"] = json.loads(raw)
            except ValueError:
                payload["child"] = None
    return payload


def _line(out: list[str], name: str, kind: str, help_text: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool):
        value = int(value)
    out.append(f"# HELP {PREFIX}{name} {help_text}")
    out.append(f"# TYPE {PREFIX}{name} {kind}")
    out.append(f"{PREFIX}{name} {value}")


def metrics_text(snap: dict[str, Any], child_port: int | None) -> str:
    """Prometheus text: the pair's metrics, then the child's own (when it answers)."""
    out: list[str] = []
    _line(out, "child_up", "gauge", "1 when a ready child serves requests.", snap["child_up"])
    _line(out, "standby_ready", "gauge", "1 when a loaded standby child is waiting.",
          bool((snap.get("standby") or {}).get("ready")))
    _line(out, "restarts_total", "counter", "Times a new child took over after a crash.",
          snap["restarts"])
    _line(out, "crashes_total", "counter", "Child deaths that metal-guard did not ask for.",
          snap["crashes"])
    _line(out, "standby_switches_total", "counter", "Crashes answered by switching to the standby.",
          snap["standby_switches"])
    _line(out, "time_to_ready_seconds", "gauge", "Start-to-ready time of the latest child.",
          snap["time_to_ready_sec"])
    _line(out, "uptime_seconds", "gauge", "Seconds since the front started.", snap["uptime_sec"])
    crash = snap.get("last_crash") or {}
    if crash.get("error_class"):
        name = f"{PREFIX}last_crash_info"
        out.append(f"# HELP {name} The class of the latest child crash (label), value 1.")
        out.append(f"# TYPE {name} gauge")
        out.append(f'{name}{{error_class="{_label(crash["error_class"])}",'
                   f'signal="{_label(crash.get("signal") or "")}"}} 1')
    text = "\n".join(out) + "\n"
    if child_port is not None:
        raw = _fetch(child_port, "/metrics")
        if raw:
            text += raw.decode("utf-8", "replace")
            if not text.endswith("\n"):
                text += "\n"
    return text


def _label(value: str) -> str:
    return "".join(ch for ch in str(value) if ch.isalnum() or ch in "_-.:")[:100]
