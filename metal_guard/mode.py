"""L6 posture (defensive / observer) and R6 process-mode defaults — both applied, not just reported.

* **Posture** comes from ``METALGUARD_MODE`` via :class:`~metal_guard.settings.Settings`.
  Defensive guards refuse and clean up; observer guards record (a breadcrumb tagged
  ``OBSERVE`` plus a log line) what they would have done and let the call through. The table of
  every guard's behaviour in both modes is in ``docs/memory.md``.
* **Process mode** (server / embedded / notebook / cli / subprocess_worker) is detected from the
  process (or forced with ``METALGUARD_PROCESS_MODE``) and selects defaults from
  ``data/process_modes.json``. The watchdog's intervals, the prefill ceiling, the KV ceiling and
  worker timeouts read them through :func:`mode_default` whenever the caller passes no value.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any, Literal

from metal_guard.settings import DEFENSIVE, OBSERVER, PROCESS_MODES, Settings, get_settings

__all__ = [
    "ProcessMode",
    "apply_mode_defaults",
    "current_mode",
    "describe_mode",
    "describe_process_mode",
    "detect_process_mode",
    "is_defensive",
    "is_observer",
    "mode_default",
]

ProcessMode = Literal["server", "embedded", "notebook", "cli", "subprocess_worker"]

_DESCRIPTIONS = {
    DEFENSIVE: "defensive mode (default): guards refuse unsafe work and clean up",
    OBSERVER: "observer mode: guards record what they would have done and let every call through",
}
_SERVER_ARGV0 = ("uvicorn", "gunicorn", "hypercorn", "fastapi")
_SERVER_MODULES = ("mlx_lm.server", "mlx.server", "mlx_vlm.server")


def current_mode(settings: Settings | None = None) -> str:
    """``"defensive"`` or ``"observer"`` (resolved now; an invalid value falls back to defensive)."""
    return (settings or get_settings()).mode


def is_defensive(settings: Settings | None = None) -> bool:
    return current_mode(settings) == DEFENSIVE


def is_observer(settings: Settings | None = None) -> bool:
    return current_mode(settings) == OBSERVER


def describe_mode(settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or get_settings()
    return {
        "mode": settings.mode,
        "description": _DESCRIPTIONS[settings.mode],
        "env_var": "METALGUARD_MODE",
        "from_env": "mode" in settings.from_env,
    }


# --------------------------------------------------------------------------- R6


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, dict[str, Any]]:
    raw = resources.files("metal_guard").joinpath("data/process_modes.json").read_text("utf-8")
    modes = json.loads(raw)["modes"]
    missing = set(PROCESS_MODES) - set(modes)
    if missing:
        raise ValueError(f"data/process_modes.json lacks modes: {sorted(missing)}")
    return {k: dict(v) for k, v in modes.items()}


def detect_process_mode(
    *, argv: Sequence[str] | None = None, modules: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
) -> ProcessMode:
    """What kind of process is this?

    Order: ``METALGUARD_PROCESS_MODE`` (forced) → ``METALGUARD_SUBPROCESS_WORKER=1`` →
    ``mlx_lm.server``-style entry points in argv → uvicorn/gunicorn/hypercorn/fastapi → an
    IPython kernel → pytest or a script (``cli``) → ``embedded``.
    """
    settings = settings or get_settings()
    if settings.process_mode:
        return settings.process_mode  # type: ignore[return-value]
    if settings.subprocess_worker:
        return "subprocess_worker"
    argv = list(sys.argv if argv is None else argv)
    modules = sys.modules if modules is None else modules
    tokens = [str(a) for a in argv]
    head = tokens[:3]
    # ``python -m pkg.mod`` puts the module's file path in argv[0]: compare path parts too.
    parts = [p.lower().removesuffix(".py") for t in head for p in re.split(r"[\\/]", t) if p]
    dotted = [".".join(parts[i:i + 2]) for i in range(len(parts) - 1)]
    if any(m in parts or m in dotted for m in _SERVER_MODULES):
        return "server"
    argv0 = os.path.basename(tokens[0]).lower() if tokens else ""
    if any(p in _SERVER_ARGV0 for p in parts) or any(s in argv0 for s in _SERVER_ARGV0):
        return "server"
    if "ipykernel" in modules or any("ipykernel_launcher" in t for t in tokens):
        return "notebook"
    if "pytest" in argv0 or any("pytest" in t for t in tokens[:3]):
        return "cli"
    if argv0.endswith(".py") or argv0.startswith("python") or argv0 in ("-c", "-m"):
        return "cli"
    return "embedded"


def apply_mode_defaults(mode: str | None = None, *, settings: Settings | None = None) -> dict[str, Any]:
    """The defaults for ``mode`` (default: the detected one), plus ``mode``.

    Keys: ``generate_timeout_sec``, ``periodic_flush_interval_sec``, ``kv_ceiling_gb``,
    ``prefill_single_alloc_ceiling_gb``, ``skip_process_lock``, ``description``. metal-guard's
    own guards use these values whenever the caller passes none (see :func:`mode_default`).
    """
    chosen = mode or detect_process_mode(settings=settings)
    table = _table()
    if chosen not in table:
        raise ValueError(f"unknown process mode {chosen!r}; expected one of {', '.join(PROCESS_MODES)}")
    return {"mode": chosen, **table[chosen]}


def mode_default(key: str, override: Any = None, *, mode: str | None = None,
                 settings: Settings | None = None) -> Any:
    """``override`` when it is not ``None``, else the process mode's default for ``key``."""
    if override is not None:
        return override
    defaults = apply_mode_defaults(mode, settings=settings)
    if key not in defaults:
        raise KeyError(f"no process-mode default named {key!r}")
    return defaults[key]


def describe_process_mode(settings: Settings | None = None) -> dict[str, Any]:
    """Dashboard summary: detected mode, where it came from, its defaults, plus the seed's
    ``argv0`` (basename of ``sys.argv[0]``), ``has_ipykernel`` and ``subprocess_worker_env``."""
    settings = settings or get_settings()
    mode = detect_process_mode(settings=settings)
    if settings.process_mode:
        source = "METALGUARD_PROCESS_MODE"
    elif settings.subprocess_worker:
        source = "METALGUARD_SUBPROCESS_WORKER"
    else:
        source = "detected"
    defaults = apply_mode_defaults(mode, settings=settings)
    return {"mode": mode, "source": source, "description": defaults.pop("description", ""),
            "defaults": {k: v for k, v in defaults.items() if k != "mode"},
            # the seed's keys (0.11 dashboards read them)
            "argv0": os.path.basename(sys.argv[0]) if sys.argv else "",
            "has_ipykernel": "ipykernel" in sys.modules,
            "subprocess_worker_env": "1" if settings.subprocess_worker else ""}
