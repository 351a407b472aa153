"""R4 prefill guard and R5 per-request KV growth tracker.

A long prompt makes one huge attention-score buffer (``n_heads x ctx x ctx``); on Apple
Silicon a single multi-GB allocation during prefill is a known panic trigger. R4 estimates that
peak from the model's dimensions and refuses (defensive) or records (observer) a prefill whose
peak passes the single-allocation ceiling or eats the headroom. Dimensions come from the
model's ``config.json`` when it is a local directory, else from ``data/model_dims.json``.

Ceilings default to the process mode's values (``apply_mode_defaults()``):
``prefill_single_alloc_ceiling_gb`` and ``kv_ceiling_gb``. Sizes here are decimal GB (1e9).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from metal_guard.breadcrumbs import breadcrumb_with_meta as _crumb
from metal_guard.errors import MetalOOMError
from metal_guard.settings import Settings, get_settings

log = logging.getLogger("metal_guard.prefill")

__all__ = [
    "KNOWN_MODELS",
    "KVGrowthTracker",
    "ModelDims",
    "describe_prefill_plan",
    "dims_from_config",
    "estimate_prefill_peak_alloc_gb",
    "kv_tracker",
    "lookup_dims",
    "recommend_chunk_size",
    "require_prefill_fit",
]

GB = 1e9
DEFAULT_HEADROOM_PCT = 0.30



def _ceiling(value: float | None) -> float:
    from metal_guard.mode import mode_default

    return float(mode_default("prefill_single_alloc_ceiling_gb", value))


@dataclass(frozen=True)
class ModelDims:
    """Attention dimensions. ``dtype_bytes`` is the activation/KV element size (2 for
    fp16/bf16; a float, so 1 or 0.5 work for quantised KV caches)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dtype_bytes: float = 2

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_heads", "n_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelDims.{name} must be a positive int, got {value!r}")
        if not self.dtype_bytes or self.dtype_bytes <= 0:
            raise ValueError(f"ModelDims.dtype_bytes must be > 0, got {self.dtype_bytes!r}")


@functools.lru_cache(maxsize=1)
def known_models() -> dict[str, ModelDims]:
    """``data/model_dims.json`` as ``{key: ModelDims}`` (read once, on first use)."""
    raw = resources.files("metal_guard").joinpath("data/model_dims.json").read_text("utf-8")
    return {key: ModelDims(**row) for key, row in json.loads(raw)["models"].items()}


#: ``{key: ModelDims}`` from ``data/model_dims.json``, loaded on first access. It is the table
#: :func:`lookup_dims` reads, so entries added at runtime are honoured.
KNOWN_MODELS: dict[str, ModelDims]


def __getattr__(name: str) -> Any:  # KNOWN_MODELS is data, loaded lazily
    if name == "KNOWN_MODELS":
        return known_models()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dims_from_config(config: dict[str, Any]) -> ModelDims | None:
    """Dimensions from a Hugging Face / mlx ``config.json`` (VLMs: its ``text_config``)."""
    text = config.get("text_config")
    cfg: dict[str, Any] = text if isinstance(text, dict) else config
    try:
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
        return ModelDims(layers, heads, kv_heads, head_dim)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def lookup_dims(model_id: str | os.PathLike[str]) -> ModelDims | None:
    """A local model directory's ``config.json``; else an exact (case-insensitive) match of the
    id's basename in ``KNOWN_MODELS``; else the longest key contained in the id; else ``None``."""
    name = os.fspath(model_id)
    local = Path(name).expanduser()
    if name and (local / "config.json").is_file():
        try:
            dims = dims_from_config(json.loads((local / "config.json").read_text("utf-8")))
        except (OSError, ValueError):
            dims = None
        if dims is not None:
            return dims
    table = known_models()
    base = name.rstrip("/").rsplit("/", 1)[-1].lower()
    for key, dims in table.items():
        if key.lower() == base:
            return dims
    lowered = name.lower()
    hits = [k for k in table if k.lower() in lowered]
    return table[max(hits, key=len)] if hits else None


def _scores_bytes(dims: ModelDims, rows: int, ctx: int) -> float:
    return dims.n_heads * rows * ctx * dims.dtype_bytes


def _kv_bytes(dims: ModelDims, ctx: int) -> float:
    return 2 * dims.n_layers * dims.n_kv_heads * ctx * dims.head_dim * dims.dtype_bytes


def estimate_prefill_peak_alloc_gb(*, context_tokens: int, dims: ModelDims) -> float:
    """Conservative upper bound of the prefill peak: the larger of the full attention-score
    buffer (``n_heads x ctx^2``) and the whole KV cache (``2 x layers x kv_heads x ctx x head_dim``)."""
    if context_tokens < 0:
        raise ValueError(f"context_tokens must be >= 0, got {context_tokens}")
    ctx = int(context_tokens)
    return max(_scores_bytes(dims, ctx, ctx), _kv_bytes(dims, ctx)) / GB


def require_prefill_fit(
    *, context_tokens: int, dims: ModelDims, available_gb: float | None,
    single_alloc_ceiling_gb: float | None = None, headroom_pct: float = DEFAULT_HEADROOM_PCT,
    settings: Settings | None = None,
) -> float:
    """Refuse a prefill whose estimated peak passes the ceiling or ``available x (1 - headroom)``.

    Defensive mode raises :class:`MetalOOMError` before anything is allocated; observer mode
    logs and records. Returns the estimated peak (GB).
    """
    if not 0 <= headroom_pct < 1:
        raise ValueError(f"headroom_pct must be in [0, 1), got {headroom_pct}")
    ceiling = _ceiling(single_alloc_ceiling_gb)
    peak = estimate_prefill_peak_alloc_gb(context_tokens=context_tokens, dims=dims)
    problem = ""
    if peak > ceiling:
        problem = f"estimated prefill peak {peak:.2f}GB exceeds the single-allocation ceiling {ceiling:.2f}GB"
    elif available_gb is not None and peak > available_gb * (1 - headroom_pct):
        problem = (f"estimated prefill peak {peak:.2f}GB exceeds {1 - headroom_pct:.0%} of the "
                   f"{available_gb:.2f}GB available")
    if not problem:
        return peak
    chunk = recommend_chunk_size(context_tokens=context_tokens, dims=dims, single_alloc_ceiling_gb=ceiling)
    hint = f"; try prefill_step_size={chunk}" if chunk < context_tokens else ""
    if not (settings or get_settings()).is_defensive:
        _crumb("OBSERVE", "require_prefill_fit would refuse", context_tokens=context_tokens, peak_gb=f"{peak:.2f}")
        log.warning("observer mode: %s%s; letting it through", problem, hint)
        return peak
    _crumb("PREFILL_REFUSED", problem, context_tokens=context_tokens)
    raise MetalOOMError(f"prefill of {context_tokens} tokens refused: {problem}{hint}")


def recommend_chunk_size(*, context_tokens: int, dims: ModelDims,
                         single_alloc_ceiling_gb: float | None = None, min_chunk: int = 512) -> int:
    """Largest prefill chunk (a multiple of ``min_chunk``) whose score block
    (``n_heads x chunk x ctx``) stays under the ceiling; the whole context if it fits; never
    below ``min_chunk``. Advisory: chunking does not shrink the KV cache itself."""
    if min_chunk <= 0:
        raise ValueError("min_chunk must be > 0")
    ctx = int(context_tokens)
    ceiling = _ceiling(single_alloc_ceiling_gb) * GB
    if ctx <= 0 or _scores_bytes(dims, ctx, ctx) <= ceiling:
        return max(ctx, 0)
    rows = int(ceiling // (dims.n_heads * ctx * dims.dtype_bytes))
    return max(min_chunk, min(ctx, rows // min_chunk * min_chunk))


def describe_prefill_plan(
    *, context_tokens: int, model_id: str | None = None, dims: ModelDims | None = None,
    available_gb: float | None = None, single_alloc_ceiling_gb: float | None = None,
    headroom_pct: float = DEFAULT_HEADROOM_PCT,
) -> dict[str, Any]:
    """Dashboard-safe summary; never raises for unknown models. Uses the same ceiling and
    headroom as :func:`require_prefill_fit`."""
    if dims is None and model_id:
        dims = lookup_dims(model_id)
    ceiling = _ceiling(single_alloc_ceiling_gb)
    plan: dict[str, Any] = {
        "model_id": model_id, "context_tokens": context_tokens, "dims_known": dims is not None,
        "single_alloc_ceiling_gb": ceiling, "headroom_pct": headroom_pct, "peak_alloc_gb": None,
        "kv_cache_gb": None, "fits_ceiling": None, "fits_headroom": None,
        "recommended_chunk_size": None, "advisory": None,
    }
    if dims is None:
        plan["advisory"] = "model dimensions unknown; cannot estimate the prefill peak"
        return plan
    peak = estimate_prefill_peak_alloc_gb(context_tokens=context_tokens, dims=dims)
    kv = _kv_bytes(dims, int(context_tokens)) / GB
    chunk = recommend_chunk_size(context_tokens=context_tokens, dims=dims, single_alloc_ceiling_gb=ceiling)
    plan.update(peak_alloc_gb=round(peak, 4), kv_cache_gb=round(kv, 4), fits_ceiling=peak <= ceiling,
                recommended_chunk_size=chunk,
                fits_headroom=None if available_gb is None else peak <= available_gb * (1 - headroom_pct))
    if kv > ceiling:
        plan["advisory"] = f"the KV cache alone ({kv:.2f}GB) exceeds the ceiling; shorten the context"
    elif not plan["fits_ceiling"]:
        plan["advisory"] = f"prefill in chunks of {chunk} tokens"
    elif plan["fits_headroom"] is False:
        plan["advisory"] = "not enough free memory for this prefill; free memory or shorten the context"
    return plan


# --------------------------------------------------------------------------- R5


class KVGrowthTracker:
    """Per-request cumulative KV bytes with a ceiling (catches one runaway request that the
    global monitor misses). Thread-safe. ``ceiling_gb`` defaults to the process mode's
    ``kv_ceiling_gb``."""

    def __init__(self, *, ceiling_gb: float | None = None, max_finished: int = 256) -> None:
        self.ceiling_gb = ceiling_gb
        self.max_finished = max_finished
        self._lock = threading.Lock()
        self._active: dict[str, dict[str, Any]] = {}
        self._finished: list[dict[str, Any]] = []

    def start(self, request_id: str, *, ceiling_gb: float | None = None) -> dict[str, Any]:
        from metal_guard.mode import mode_default

        ceiling = float(mode_default("kv_ceiling_gb", ceiling_gb if ceiling_gb is not None else self.ceiling_gb))
        if ceiling <= 0:
            raise ValueError(f"ceiling_gb must be > 0, got {ceiling}")
        entry = {"request_id": str(request_id), "bytes": 0, "cumulative_gb": 0.0, "step_count": 0,
                 "ceiling_gb": ceiling, "started_at": time.time(),
                 "aborted": False, "exceeded": False, "finished": False}
        with self._lock:
            self._active[str(request_id)] = entry
        return dict(entry)

    def add_bytes(self, request_id: str, n: int) -> int:
        """Add ``n`` bytes; return the running total. Passing the ceiling raises
        :class:`MetalOOMError` in defensive mode (and on every later call for that request);
        observer mode marks the entry ``exceeded`` and records it. Unknown ids are ignored.
        A negative, non-finite or non-numeric ``n`` raises ``ValueError`` (KV only grows)."""
        if isinstance(n, bool) or not isinstance(n, int | float) or not math.isfinite(n) or n < 0:
            raise ValueError(f"bytes added must be a finite number >= 0, got {n!r}")
        with self._lock:
            entry = self._active.get(str(request_id))
            if entry is None:
                return 0
            if entry["aborted"]:
                raise MetalOOMError(f"KV growth of request {request_id!r} already exceeded its ceiling")
            entry["bytes"] += int(n)
            entry["step_count"] += 1
            entry["cumulative_gb"] = round(entry["bytes"] / GB, 3)
            total, ceiling = entry["bytes"], entry["ceiling_gb"]
            over = total > ceiling * GB and not entry["exceeded"]
            if over:
                entry["exceeded"] = True
                defensive = get_settings().is_defensive
                entry["aborted"] = defensive
        if over:
            msg = f"request {request_id!r} grew its KV cache to {total / GB:.2f}GB (> {ceiling:.2f}GB ceiling)"
            if defensive:
                _crumb("KV_CEILING", msg)
                raise MetalOOMError(msg)
            _crumb("OBSERVE", "KV ceiling passed: would abort", request_id=request_id)
            log.warning("observer mode: %s", msg)
        return int(total)

    def finalize(self, request_id: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._active.pop(str(request_id), None)
            if entry is None:
                return None
            entry.update(finished=True, finished_at=time.time(), gb=entry["bytes"] / GB)
            self._finished.append(entry)
            del self._finished[: -self.max_finished]
            return dict(entry)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e, running=True) for e in self._active.values()] + [
                dict(e, running=False) for e in self._finished[-20:]]

    def reset(self) -> None:
        with self._lock:
            self._active.clear()
            self._finished.clear()


kv_tracker = KVGrowthTracker()
