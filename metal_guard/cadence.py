"""L9 cadence: refuse back-to-back model loads, a known IOGPU panic trigger.

State is ``{model_id: epoch_seconds}`` in ``<state>/cadence.json`` (the seed's format). Rules,
checked in this order for a load of ``model_id`` at time ``now``:

1. **Same model** — if ``model_id`` was loaded less than ``min_interval_sec`` ago
   (default 180 s, ``METALGUARD_CADENCE_MIN_INTERVAL_SEC``) → :class:`CadenceViolation`.
2. **Cross model** — if the most recent load of *another* model is less than the effective
   cross-model interval ago → :class:`CrossModelCadenceViolation`. The effective interval is
   ``cross_model_interval_sec`` (default 0 = off, ``METALGUARD_CROSS_MODEL_INTERVAL``), raised
   to :data:`GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC` (90 s) when the model being loaded is a
   gemma-4 family model (:func:`is_gemma4_family`) — **even when the base interval is 0**.

:func:`require_cadence_clear` checks and records the load in one locked read-modify-write of
the state file, so of several processes racing for the same model exactly one gets through.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metal_guard import storage
from metal_guard.errors import CadenceViolation, CrossModelCadenceViolation, SettingsError
from metal_guard.migrate import ensure_imported as ensure_legacy_imported
from metal_guard.settings import get_settings

log = logging.getLogger("metal_guard.cadence")

__all__ = [
    "CADENCE_GC_AGE_SEC",
    "GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC",
    "CadenceGuard",
    "is_gemma4_family",
    "require_cadence_clear",
]

#: Cross-model floor for gemma-4 family targets (seconds).
GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC = 90.0
#: Entries older than this (or than the longest configured interval, if longer) are dropped.
CADENCE_GC_AGE_SEC = 4 * 3600.0
#: Entries further than this in the future (clock jumps, hand edits) are ignored and dropped.
FUTURE_SKEW_SEC = 60.0
CADENCE_FILE = "cadence.json"

# The model's last path component: "gemma-4-" + a size token ("31b", "e4b", "26b") and an
# optional "-suffix" (it, a4b, 4bit, qat...). "gemma-4b-it" (no family number) does not match.
_GEMMA4_RE = re.compile(r"^gemma-?4-(?:\d+(?:\.\d+)?b|e\d+b)(?:[-_.][a-z0-9._\-]*)?$", re.IGNORECASE)


def is_gemma4_family(model_id: str) -> bool:
    """True for a gemma-4 family model, named by hub id or local path, any publisher.

    The reference accepted only three publishers (``mlx-community``, ``unsloth``,
    ``mlx-models``); the hazard comes from the architecture, not the uploader, so a local
    conversion (``~/models/gemma-4-31b-it-8bit``) or ``google/gemma-4-31b-it`` gets the
    floor too.
    """
    if not isinstance(model_id, str):
        return False
    base = model_id.strip().rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    return bool(_GEMMA4_RE.match(base))


def _interval(name: str, value: float | None, default: float) -> float:
    if value is None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingsError(name, value, "a number of seconds >= 0")
    if not math.isfinite(value) or value < 0:
        raise SettingsError(name, value, "a finite number of seconds >= 0")
    return float(value)


def _model_key(model_id: str) -> str:
    if not isinstance(model_id, str) or not model_id.strip():
        raise ValueError(f"model_id must be a non-empty string, not {model_id!r}")
    return model_id.strip()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _valid_state(obj: Any) -> bool:
    return all(isinstance(k, str) and _is_number(v) for k, v in obj.items())


class CadenceGuard:
    """Persisted per-model load timestamps with same-model and cross-model intervals.

    ``None`` intervals come from :func:`~metal_guard.settings.get_settings` at construction.
    ``clock`` (default :func:`time.time`) supplies "now" when a method gets no ``now=``.
    """

    def __init__(
        self,
        path: Path | str | None = None,
        *,
        min_interval_sec: float | None = None,
        cross_model_interval_sec: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        settings = get_settings()
        ensure_legacy_imported(settings)  # recent metal-guard 0.11 loads still count (migrate.py)
        self._path = Path(path) if path is not None else settings.state_file(CADENCE_FILE)
        self._min = _interval("min_interval_sec", min_interval_sec, settings.cadence_min_interval_sec)
        self._cross = _interval(
            "cross_model_interval_sec", cross_model_interval_sec, settings.cross_model_interval_sec
        )
        self._clock = clock or time.time

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> Path:
        return self._path

    @property
    def min_interval_sec(self) -> float:
        return self._min

    @property
    def cross_model_interval_sec(self) -> float:
        return self._cross

    def effective_cross_model_interval(self, model_id: str) -> float:
        """The cross-model interval that applies to loading ``model_id`` (gemma-4 floor included)."""
        if is_gemma4_family(model_id):
            return max(self._cross, GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC)
        return self._cross

    # ------------------------------------------------------------------ state

    def _now(self, now: float | None) -> float:
        return float(now) if now is not None else float(self._clock())

    def _read(self) -> dict[str, float]:
        return storage.read_json(self._path, dict, expect=dict, validate=_valid_state)

    def entries(self) -> dict[str, float]:
        """A copy of the recorded ``{model_id: epoch}`` loads."""
        return dict(self._read())

    def last_ts(self, model_id: str) -> float | None:
        """When ``model_id`` was last recorded as loaded (epoch seconds), or None."""
        value = self._read().get(_model_key(model_id))
        return float(value) if value is not None else None

    def _gc(self, state: dict[str, float], now: float) -> None:
        horizon = max(CADENCE_GC_AGE_SEC, self._min, self._cross, GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC)
        for key in [k for k, ts in state.items() if now - ts > horizon or ts - now > FUTURE_SKEW_SEC]:
            del state[key]

    def _evaluate(self, state: dict[str, float], model_id: str, now: float) -> None:
        last = state.get(model_id)
        if last is not None and last - now <= FUTURE_SKEW_SEC and self._min > 0:
            delta = max(0.0, now - last)
            if delta < self._min:
                raise CadenceViolation(model_id, last_ts=last, min_interval=self._min, delta=delta)
        cross = self.effective_cross_model_interval(model_id)
        if cross <= 0:
            return
        others = [
            (ts, m) for m, ts in state.items() if m != model_id and ts - now <= FUTURE_SKEW_SEC
        ]
        if not others:
            return
        last_other, other = max(others)
        delta = max(0.0, now - last_other)
        if delta < cross:
            raise CrossModelCadenceViolation(
                model_id,
                last_model=other,
                last_ts=last_other,
                cross_model_interval=cross,
                delta=delta,
            )

    # ------------------------------------------------------------------ API

    def check(self, model_id: str, *, now: float | None = None) -> None:
        """Raise :class:`CadenceViolation` / :class:`CrossModelCadenceViolation` if loading
        ``model_id`` now would be too soon. Records nothing."""
        self._evaluate(self._read(), _model_key(model_id), self._now(now))

    def seconds_until_clear(self, model_id: str, *, now: float | None = None) -> float:
        """How long until :meth:`check` would pass for ``model_id`` (0.0 when it passes now)."""
        key = _model_key(model_id)
        at = self._now(now)
        state = self._read()
        wait = 0.0
        for _ in range(len(state) + 2):  # the cross-model rule can hand over to the next model
            try:
                self._evaluate(state, key, at + wait)
            except CadenceViolation as exc:
                wait += max(exc.remaining_sec, 1e-6)
                continue
            return round(wait, 6)
        return round(wait, 6)  # pragma: no cover - bounded by the number of entries

    def mark_load(self, model_id: str, ts: float | None = None) -> None:
        """Record that ``model_id`` was loaded at ``ts`` (default now); drops old entries."""
        key = _model_key(model_id)
        at = self._now(ts)

        def apply(state: dict[str, float]) -> None:
            state[key] = at
            self._gc(state, at)

        storage.update_json(self._path, apply, dict, expect=dict, validate=_valid_state)

    def require_clear(self, model_id: str, *, now: float | None = None) -> float:
        """Check and record a load of ``model_id`` atomically across processes; return its time.

        The check runs inside the locked read-modify-write: when it raises, nothing is written.
        """
        key = _model_key(model_id)
        at = self._now(now)

        def apply(state: dict[str, float]) -> None:
            self._evaluate(state, key, at)
            state[key] = at
            self._gc(state, at)

        storage.update_json(self._path, apply, dict, expect=dict, validate=_valid_state)
        return at

    def reset(self, model_id: str | None = None) -> None:
        """Forget ``model_id`` (or every model)."""
        key = None if model_id is None else _model_key(model_id)

        def apply(state: dict[str, float]) -> dict[str, float]:
            if key is None:
                return {}
            state.pop(key, None)
            return state

        storage.update_json(self._path, apply, dict, expect=dict, validate=_valid_state)

    def __repr__(self) -> str:
        return (
            f"CadenceGuard(path={str(self._path)!r}, min_interval_sec={self._min:g}, "
            f"cross_model_interval_sec={self._cross:g})"
        )


def require_cadence_clear(
    model_id: str,
    *,
    min_interval_sec: float | None = None,
    cross_model_interval_sec: float | None = None,
    guard: CadenceGuard | None = None,
    now: float | None = None,
) -> float:
    """Refuse a load of ``model_id`` that comes too soon, else record it; atomic across processes.

    Intervals left as ``None`` come from ``guard`` when one is given, else from the settings.
    An explicit value (including 0) beats the environment. Returns the recorded load time.
    """
    if guard is None:
        guard = CadenceGuard(
            min_interval_sec=min_interval_sec, cross_model_interval_sec=cross_model_interval_sec
        )
    elif min_interval_sec is not None or cross_model_interval_sec is not None:
        guard = CadenceGuard(
            guard.path,
            min_interval_sec=guard.min_interval_sec if min_interval_sec is None else min_interval_sec,
            cross_model_interval_sec=(
                guard.cross_model_interval_sec
                if cross_model_interval_sec is None
                else cross_model_interval_sec
            ),
            clock=guard._clock,
        )
    return guard.require_clear(model_id, now=now)
