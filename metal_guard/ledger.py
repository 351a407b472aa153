"""The measured-peak ledger: what a model really needed, the last time it was loaded here.

``<state>/peak_ledger.json`` stores the measured MLX peak (and the growth of the process
footprint) of a model per (model, quantisation, context, mlx version, chip). Re-recording keeps
the largest peak seen and counts samples. Fit checks (:mod:`metal_guard.memory`) prefer a ledger
entry over any estimate. Every write is a locked read-modify-write through :mod:`~metal_guard.storage`;
a corrupt ledger is quarantined and starts afresh. An unreadable one is never replaced: a
record raises :class:`~metal_guard.errors.StateFileError` and a lookup falls back to estimates.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from metal_guard import backend, storage
from metal_guard.errors import StateFileError
from metal_guard.hardware import detect_hardware, process_footprint_bytes
from metal_guard.modelsize import estimate_model_size
from metal_guard.settings import Settings, get_settings

__all__ = [
    "LEDGER_FILE",
    "PeakMeasurement",
    "forget_peaks",
    "ledger_entries",
    "ledger_path",
    "lookup_peak",
    "measure_peak",
    "record_peak",
]

LEDGER_FILE = "peak_ledger.json"
log = logging.getLogger("metal_guard.ledger")


def ledger_path(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).state_file(LEDGER_FILE)


@functools.lru_cache(maxsize=1)
def _chip() -> str:
    return str(detect_hardware(load=False, include_driver=False).get("chip") or "unknown")


def _model_key(model: str) -> str:
    local = Path(model).expanduser()
    return str(local.resolve()) if model and local.is_dir() else model


def _key(model: str, quant: str | None, ctx: int | None, mlx: str | None, chip: str | None) -> str:
    return "|".join((_model_key(model), quant or "-", str(ctx) if ctx else "-",
                     mlx or backend.mlx_version() or "-", chip or _chip()))


def _valid_ledger(obj: Any) -> bool:
    entries = obj.get("entries")
    return isinstance(entries, dict) and all(
        isinstance(e, dict) and isinstance(e.get("peak_bytes"), int) for e in entries.values())


def _fresh_ledger() -> dict[str, Any]:
    return {"version": 1, "entries": {}}


def _load_ledger(settings: Settings | None = None) -> dict[str, Any]:
    state: dict[str, Any] = storage.read_json(ledger_path(settings), _fresh_ledger,
                                              validate=_valid_ledger)
    return state


def _load_ledger_for_lookup(settings: Settings | None) -> dict[str, Any]:
    """The ledger for a fit check: an unreadable ledger is reported and left alone (never
    replaced); the fit check then falls back to the size estimate."""
    try:
        return _load_ledger(settings)
    except StateFileError as exc:
        log.warning("peak ledger unavailable, using size estimates instead: %s", exc)
        return _fresh_ledger()


def record_peak(model: str | os.PathLike[str], peak_bytes: int, *, quantization: str | None = None,
                context_tokens: int | None = None, footprint_delta_bytes: int | None = None,
                mlx_version: str | None = None, chip: str | None = None,
                settings: Settings | None = None) -> dict[str, Any]:
    """Store a measured peak. Re-recording keeps the largest peak seen and counts samples."""
    name = os.fspath(model)
    if not name or int(peak_bytes) < 0:
        raise ValueError("record_peak needs a model name and peak_bytes >= 0")
    quant = quantization or estimate_model_size(name).quantization
    key = _key(name, quant, context_tokens, mlx_version, chip)
    now = datetime.now(UTC).isoformat()
    fp = int(footprint_delta_bytes) if footprint_delta_bytes is not None else None

    def update(state: dict[str, Any]) -> None:
        old = state["entries"].get(key, {})
        peak = max(int(peak_bytes), int(old.get("peak_bytes", 0)))
        fp_max = max(x for x in (fp, old.get("footprint_delta_bytes"), -1) if x is not None)
        state["entries"][key] = {
            "model": _model_key(name), "quantization": quant, "context_tokens": context_tokens,
            "mlx_version": mlx_version or backend.mlx_version(), "chip": chip or _chip(),
            "peak_bytes": peak, "last_peak_bytes": int(peak_bytes),
            "footprint_delta_bytes": fp_max if fp_max >= 0 else None,
            "required_bytes": max(peak, fp_max), "samples": int(old.get("samples", 0)) + 1,
            "first_recorded_at": old.get("first_recorded_at", now), "recorded_at": now,
        }

    state: dict[str, Any] = storage.update_json(
        ledger_path(settings), update, _fresh_ledger, validate=_valid_ledger)
    return dict(state["entries"][key])


def lookup_peak(model: str | os.PathLike[str], *, quantization: str | None = None,
                context_tokens: int | None = None, mlx_version: str | None = None,
                chip: str | None = None, settings: Settings | None = None) -> dict[str, Any] | None:
    """The ledger entry for this model on this mlx version and chip: the exact context if
    recorded, else the smallest recorded context that is larger (a conservative stand-in);
    with no context given, the largest peak recorded. ``None`` when nothing applies."""
    name = _model_key(os.fspath(model))
    if not name:
        return None
    mlx, chip = mlx_version or backend.mlx_version(), chip or _chip()
    matches: list[dict[str, Any]] = [e for e in _load_ledger_for_lookup(settings)["entries"].values()
               if e.get("model") == name and e.get("mlx_version") == mlx and e.get("chip") == chip
               and (quantization is None or e.get("quantization") in (quantization, None))]
    if not matches:
        return None
    if context_tokens is None:
        best = max(matches, key=lambda e: int(e.get("required_bytes") or e["peak_bytes"]))
        return dict(best)
    exact = [e for e in matches if e.get("context_tokens") == context_tokens]
    larger = [e for e in matches if (e.get("context_tokens") or 0) > context_tokens]
    pick = exact or sorted(larger, key=lambda e: e["context_tokens"])[:1]
    return dict(pick[0]) if pick else None


def ledger_entries(settings: Settings | None = None) -> list[dict[str, Any]]:
    return [dict(e) for e in _load_ledger(settings)["entries"].values()]


def forget_peaks(model: str | None = None, *, settings: Settings | None = None) -> int:
    """Remove ledger entries (of ``model``, or all); return how many were removed."""
    removed = 0

    def update(state: dict[str, Any]) -> None:
        nonlocal removed
        keep = {k: e for k, e in state["entries"].items()
                if model is not None and e.get("model") != _model_key(model)}
        removed = len(state["entries"]) - len(keep)
        state["entries"] = keep

    storage.update_json(ledger_path(settings), update, _fresh_ledger, validate=_valid_ledger)
    return removed


@dataclass
class PeakMeasurement:
    model: str
    baseline_footprint_bytes: int | None
    peak_bytes: int | None = None
    footprint_delta_bytes: int | None = None
    entry: dict[str, Any] | None = None


@contextlib.contextmanager
def measure_peak(model: str | os.PathLike[str], *, quantization: str | None = None,
                 context_tokens: int | None = None, record: bool = True) -> Iterator[PeakMeasurement]:
    """Reset the MLX peak, run the block (a load plus a first generate), then record the peak
    in the ledger. Nothing is recorded if the block raises or MLX is not loaded."""
    backend.reset_peak_memory(load=False)
    m = PeakMeasurement(os.fspath(model), process_footprint_bytes())
    yield m
    counters = backend.memory_counters(load=False)
    if counters is None:
        return
    m.peak_bytes = counters.peak_bytes
    now_fp = process_footprint_bytes()
    if now_fp is not None and m.baseline_footprint_bytes is not None:
        m.footprint_delta_bytes = max(0, now_fp - m.baseline_footprint_bytes)
    if record:
        m.entry = record_peak(m.model, m.peak_bytes, quantization=quantization,
                              context_tokens=context_tokens,
                              footprint_delta_bytes=m.footprint_delta_bytes)
