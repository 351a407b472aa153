"""L9 cadence: refuse back-to-back model loads, a known IOGPU panic trigger.

State is ``<state>/cadence.json``: ``{model_id: record}`` where a record is
``{"ts": epoch, "pid": ..., "cmd": ..., "interval_sec": ..., "interval_source": ...}`` plus
``job`` / ``ranks`` / ``world_size`` for a distributed job. A bare number (the seed's format)
is still read as ``{"ts": number}``. Rules, checked in this order for a load of ``model_id``:

1. **Same model** — if ``model_id`` was loaded less than its interval ago →
   :class:`CadenceViolation`. The interval is the explicit setting when one is given
   (``min_interval_sec=`` / ``METALGUARD_CADENCE_MIN_INTERVAL_SEC``: wins in both directions),
   else the risk-scaled interval of :mod:`metal_guard.cadence_risk` (model size relative to the
   GPU working set, registry and gemma-4 floors; tiny models 0).
2. **Cross model** — if the most recent load of *another* model is less than the effective
   cross-model interval ago → :class:`CrossModelCadenceViolation`. The effective interval is
   ``cross_model_interval_sec`` (default 0 = off, ``METALGUARD_CROSS_MODEL_INTERVAL``), raised
   to :data:`GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC` (90 s) when the model being loaded is a
   gemma-4 family model (:func:`is_gemma4_family`) — **even when the base interval is 0**.

**Distributed jobs.** The ranks of one job (same job key, :mod:`metal_guard.distributed`)
loading their shards are one logical load: a rank whose job already recorded the model, and
that has not itself loaded it yet, joins the entry instead of being refused. A rank that loads
the model a second time (or a later run of the same command) is a new load.

:func:`require_cadence_clear` checks and records the load in one locked read-modify-write of
the state file, so of several processes racing for the same model exactly one gets through.
:func:`clear_for_load` (what the installed adapters call) adds the interactive countdown of
:mod:`metal_guard.cadence_wait`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metal_guard import storage
from metal_guard.cadence_risk import CadenceInterval, explicit_interval, risk_interval
from metal_guard.errors import CadenceViolation, CrossModelCadenceViolation, SettingsError
from metal_guard.knowledge.families import is_gemma4_family
from metal_guard.migrate import ensure_imported as ensure_legacy_imported
from metal_guard.settings import Settings, get_settings

if TYPE_CHECKING:
    from metal_guard.distributed import RankInfo

log = logging.getLogger("metal_guard.cadence")

__all__ = [
    "CADENCE_GC_AGE_SEC",
    "GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC",
    "CadenceGuard",
    "clear_for_load",
    "require_cadence_clear",
]

#: Cross-model floor for gemma-4 family targets (seconds).
GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC = 90.0
#: Entries older than this (or than the longest configured interval, if longer) are dropped.
CADENCE_GC_AGE_SEC = 4 * 3600.0
#: Entries further than this in the future (clock jumps, hand edits) are ignored and dropped.
FUTURE_SKEW_SEC = 60.0
CADENCE_FILE = "cadence.json"
ENV_VAR = "METALGUARD_CADENCE_MIN_INTERVAL_SEC"
CMD_MAX_CHARS = 120
MAX_RANKS = 1024

def _interval(name: str, value: float | None, default: float | None) -> float | None:
    if value is None:
        return None if default is None else float(default)
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
    return all(isinstance(k, str) and (_is_number(v) or (isinstance(v, dict) and _is_number(v.get("ts"))))
               for k, v in obj.items())


def _text(value: Any, limit: int) -> str | None:
    if not isinstance(value, str):
        return None
    clean = "".join(ch if ch.isprintable() else "?" for ch in value)[:limit]
    return clean or None


def record_of(raw: Any) -> dict[str, Any] | None:
    """A state value as a clean record (``None`` for garbage). Foreign fields are dropped,
    strings clipped and de-controlled, numbers checked: the file is not trusted."""
    if _is_number(raw):
        return {"ts": float(raw)}
    if not isinstance(raw, dict) or not _is_number(raw.get("ts")):
        return None
    rec: dict[str, Any] = {"ts": float(raw["ts"])}
    pid = raw.get("pid")
    if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 1 << 31:
        rec["pid"] = pid
    for key, limit in (("cmd", CMD_MAX_CHARS), ("job", 100), ("interval_source", 40)):
        text = _text(raw.get(key), limit)
        if text is not None:
            rec[key] = text
    if _is_number(raw.get("interval_sec")) and raw["interval_sec"] >= 0:
        rec["interval_sec"] = float(raw["interval_sec"])
    ranks = raw.get("ranks")
    if isinstance(ranks, list):
        rec["ranks"] = sorted({r for r in ranks[:MAX_RANKS]
                               if isinstance(r, int) and not isinstance(r, bool) and 0 <= r < 1 << 20})
    world = raw.get("world_size")
    if isinstance(world, int) and not isinstance(world, bool) and 0 < world < 1 << 20:
        rec["world_size"] = world
    return rec


def _own_cmd() -> str:
    argv = [a for a in (sys.argv or []) if isinstance(a, str)]
    text = " ".join([os.path.basename(argv[0]) if argv else "python", *argv[1:3]])
    return _text(text, CMD_MAX_CHARS) or "python"


def _retry_at(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S UTC")


def _by(rec: dict[str, Any]) -> str:
    if "pid" not in rec:
        return ""
    who = f" by pid {rec['pid']}" + (f" ({rec['cmd']})" if rec.get("cmd") else "")
    if "ranks" in rec:
        who += f", rank(s) {','.join(map(str, rec['ranks']))} of job {rec.get('job', '?')}"
    return who


class CadenceGuard:
    """Persisted per-model loads with a risk-scaled same-model interval and a cross-model one.

    ``min_interval_sec`` ``None`` means: the setting if one is set, else risk-scaled per model
    (:meth:`interval_for`). ``clock`` (default :func:`time.time`) supplies "now" when a method
    gets no ``now=``. ``settings`` defaults to :func:`~metal_guard.settings.get_settings`.
    """

    def __init__(
        self,
        path: Path | str | None = None,
        *,
        min_interval_sec: float | None = None,
        cross_model_interval_sec: float | None = None,
        clock: Callable[[], float] | None = None,
        settings: Settings | None = None,
    ) -> None:
        settings = settings or get_settings()
        ensure_legacy_imported(settings)  # recent metal-guard 0.11 loads still count (migrate.py)
        self._path = Path(path) if path is not None else settings.state_file(CADENCE_FILE)
        self._min = _interval("min_interval_sec", min_interval_sec, settings.cadence_min_interval_sec)
        if min_interval_sec is not None:
            self._origin = "min_interval_sec"
        elif "cadence_min_interval_sec" in settings.from_env:
            self._origin = ENV_VAR
        else:
            self._origin = "the cadence_min_interval_sec option"
        cross = _interval("cross_model_interval_sec", cross_model_interval_sec,
                          settings.cross_model_interval_sec)
        self._cross = float(cross or 0.0)
        self._clock = clock or time.time

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> Path:
        return self._path

    @property
    def min_interval_sec(self) -> float | None:
        """The explicit same-model interval, or ``None`` when it is risk-scaled per model."""
        return self._min

    @property
    def cross_model_interval_sec(self) -> float:
        return self._cross

    def interval_for(self, model_id: str, model_path: str | None = None) -> CadenceInterval:
        """The same-model interval that applies to ``model_id`` (sized from ``model_path`` when
        given, e.g. the local directory an adapter loads) and why."""
        if self._min is not None:
            return explicit_interval(self._min, self._origin)
        return risk_interval(model_path or _model_key(model_id))

    def effective_cross_model_interval(self, model_id: str) -> float:
        """The cross-model interval that applies to loading ``model_id`` (gemma-4 floor included)."""
        if is_gemma4_family(model_id):
            return max(self._cross, GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC)
        return self._cross

    # ------------------------------------------------------------------ state

    def _now(self, now: float | None) -> float:
        return float(now) if now is not None else float(self._clock())

    def _read(self) -> dict[str, Any]:
        return storage.read_json(self._path, dict, expect=dict, validate=_valid_state)

    def records(self) -> dict[str, dict[str, Any]]:
        """The recorded loads, ``{model_id: record}`` (cleaned; see :func:`record_of`)."""
        out = {}
        for key, raw in self._read().items():
            rec = record_of(raw)
            if rec is not None:
                out[key] = rec
        return out

    def entries(self) -> dict[str, float]:
        """A copy of the recorded ``{model_id: epoch}`` loads."""
        return {k: r["ts"] for k, r in self.records().items()}

    def last_ts(self, model_id: str) -> float | None:
        """When ``model_id`` was last recorded as loaded (epoch seconds), or None."""
        rec = record_of(self._read().get(_model_key(model_id)))
        return None if rec is None else float(rec["ts"])

    def _gc(self, state: dict[str, Any], now: float) -> None:
        horizon = max(CADENCE_GC_AGE_SEC, self._min or 0.0, self._cross,
                      GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC)
        for key in list(state):
            rec = record_of(state[key])
            if rec is None or now - rec["ts"] > horizon or rec["ts"] - now > FUTURE_SKEW_SEC:
                del state[key]

    @staticmethod
    def _joins(rec: dict[str, Any] | None, rank: RankInfo | None) -> bool:
        """A rank of the job that recorded ``rec``, which has not loaded the model itself yet."""
        return (rec is not None and rank is not None and rec.get("job") == rank.job
                and "ranks" in rec and rank.rank not in rec["ranks"])

    def _evaluate(self, state: dict[str, Any], model_id: str, now: float,
                  interval: CadenceInterval, rank: RankInfo | None = None) -> bool:
        """Raise on a violation; return True when this load joins its job's earlier load."""
        rec = record_of(state.get(model_id))
        if rec is not None and rec["ts"] - now <= FUTURE_SKEW_SEC:
            if self._joins(rec, rank):
                return True
            delta = max(0.0, now - rec["ts"])
            if interval.seconds > 0 and delta < interval.seconds:
                raise self._same_model_error(model_id, rec, delta, interval, now)
        cross = self.effective_cross_model_interval(model_id)
        if cross <= 0:
            return False
        others = []
        for other, raw in state.items():
            orec = record_of(raw)
            if other == model_id or orec is None or orec["ts"] - now > FUTURE_SKEW_SEC:
                continue
            if self._joins(orec, rank):
                continue  # the other model is part of this job's own logical load
            others.append((orec["ts"], other, orec))
        if not others:
            return False
        last_other, other, orec = max(others, key=lambda t: (t[0], t[1]))
        delta = max(0.0, now - last_other)
        if delta < cross:
            raise self._cross_model_error(model_id, other, orec, delta, cross, now)
        return False

    def _same_model_error(self, model_id: str, rec: dict[str, Any], delta: float,
                          interval: CadenceInterval, now: float) -> CadenceViolation:
        remaining = interval.seconds - delta
        if interval.source == "setting":
            relax = (f"lower {ENV_VAR} (it is used as given; 0 turns the same-model rule off)"
                     if self._origin == ENV_VAR else
                     f"pass a smaller {self._origin} (0 turns the same-model rule off)")
        else:
            relax = (f"set {ENV_VAR}=<seconds> to override the risk-scaled interval (0 turns "
                     "the same-model rule off)")
        message = (
            f"cadence: {model_id[:200]!r} was loaded {delta:.1f}s ago{_by(rec)}; it needs "
            f"{interval.seconds:.0f}s between loads because {interval.reason}. Retry at "
            f"{_retry_at(now + remaining)} (retry in {remaining:.1f}s). To relax: {relax}, or "
            f"forget that load with `metal-guard cadence reset {_quote(model_id)}`; "
            "METALGUARD_CADENCE=0 switches cadence off."
        )
        return CadenceViolation(model_id, last_ts=rec["ts"], min_interval=interval.seconds,
                                delta=delta, message=message, reason=interval.reason,
                                last_pid=rec.get("pid"))

    def _cross_model_error(self, model_id: str, other: str, rec: dict[str, Any], delta: float,
                           cross: float, now: float) -> CrossModelCadenceViolation:
        remaining = cross - delta
        if is_gemma4_family(model_id) and cross == GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC:
            why = (f"{model_id[:200]!r} is a gemma-4 family model, which keeps a "
                   f"{GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC:.0f}s floor after any other load "
                   "(the seed's gemma-4 panics)")
        else:
            why = f"METALGUARD_CROSS_MODEL_INTERVAL asks for {cross:.0f}s"
        message = (
            f"cross-model cadence: {other[:200]!r} was loaded {delta:.1f}s ago{_by(rec)}; loading "
            f"{model_id[:200]!r} needs {cross:.0f}s between models because {why}. Retry at "
            f"{_retry_at(now + remaining)} (retry in {remaining:.1f}s). To relax: lower "
            f"METALGUARD_CROSS_MODEL_INTERVAL, or forget that load with "
            f"`metal-guard cadence reset {_quote(other)}`; METALGUARD_CADENCE=0 switches cadence off."
        )
        return CrossModelCadenceViolation(model_id, last_model=other, last_ts=rec["ts"],
                                          cross_model_interval=cross, delta=delta, message=message,
                                          reason=why, last_pid=rec.get("pid"))

    # ------------------------------------------------------------------ API

    def check(self, model_id: str, *, now: float | None = None, model_path: str | None = None,
              rank: RankInfo | None = None) -> None:
        """Raise :class:`CadenceViolation` / :class:`CrossModelCadenceViolation` if loading
        ``model_id`` now would be too soon. Records nothing."""
        key = _model_key(model_id)
        self._evaluate(self._read(), key, self._now(now), self.interval_for(key, model_path), rank)

    def seconds_until_clear(self, model_id: str, *, now: float | None = None,
                            model_path: str | None = None, rank: RankInfo | None = None) -> float:
        """How long until :meth:`check` would pass for ``model_id`` (0.0 when it passes now)."""
        key = _model_key(model_id)
        at = self._now(now)
        state = self._read()
        interval = self.interval_for(key, model_path)
        wait = 0.0
        for _ in range(len(state) + 2):  # the cross-model rule can hand over to the next model
            try:
                self._evaluate(state, key, at + wait, interval, rank)
            except CadenceViolation as exc:
                wait += max(exc.remaining_sec, 1e-6)
                continue
            return round(wait, 6)
        return round(wait, 6)  # pragma: no cover - bounded by the number of entries

    def _new_record(self, at: float, interval: CadenceInterval | None,
                    rank: RankInfo | None) -> dict[str, Any]:
        rec: dict[str, Any] = {"ts": at, "pid": os.getpid(), "cmd": _own_cmd()}
        if interval is not None:
            rec.update(interval_sec=interval.seconds, interval_source=interval.source)
        if rank is not None:
            rec.update(job=rank.job, ranks=[rank.rank])
            if rank.world_size is not None:
                rec["world_size"] = rank.world_size
        return rec

    def mark_load(self, model_id: str, ts: float | None = None, *,
                  rank: RankInfo | None = None) -> None:
        """Record that ``model_id`` was loaded at ``ts`` (default now); drops old entries."""
        key = _model_key(model_id)
        at = self._now(ts)

        def apply(state: dict[str, Any]) -> None:
            state[key] = self._new_record(at, None, rank)
            self._gc(state, at)

        storage.update_json(self._path, apply, dict, expect=dict, validate=_valid_state)

    def require_clear(self, model_id: str, *, now: float | None = None,
                      model_path: str | None = None, rank: RankInfo | None = None) -> float:
        """Check and record a load of ``model_id`` atomically across processes; return its time.

        The check runs inside the locked read-modify-write: when it raises, nothing is written.
        A rank joining its job's earlier load is added to that entry (its time is kept).
        """
        key = _model_key(model_id)
        at = self._now(now)
        interval = self.interval_for(key, model_path)
        recorded = [at]

        def apply(state: dict[str, Any]) -> None:
            if self._evaluate(state, key, at, interval, rank):
                rec = record_of(state[key]) or {"ts": at}
                assert rank is not None
                rec["ranks"] = sorted({*rec.get("ranks", []), rank.rank})[:MAX_RANKS]
                state[key] = rec
                recorded[0] = rec["ts"]
            else:
                state[key] = self._new_record(at, interval, rank)
            self._gc(state, at)

        storage.update_json(self._path, apply, dict, expect=dict, validate=_valid_state)
        return recorded[0]

    def reset(self, model_id: str | None = None) -> bool:
        """Forget ``model_id`` (or every model); True when something was forgotten."""
        key = None if model_id is None else _model_key(model_id)
        found = [False]

        def apply(state: dict[str, Any]) -> dict[str, Any]:
            found[0] = bool(state) if key is None else key in state
            if key is None:
                return {}
            state.pop(key, None)
            return state

        storage.update_json(self._path, apply, dict, expect=dict, validate=_valid_state)
        return found[0]

    def __repr__(self) -> str:
        rule = "risk-scaled" if self._min is None else f"{self._min:g}"
        return (f"CadenceGuard(path={str(self._path)!r}, min_interval_sec={rule}, "
                f"cross_model_interval_sec={self._cross:g})")


def _quote(model_id: str) -> str:
    import shlex

    return shlex.quote(model_id[:200])


def require_cadence_clear(
    model_id: str,
    *,
    min_interval_sec: float | None = None,
    cross_model_interval_sec: float | None = None,
    guard: CadenceGuard | None = None,
    now: float | None = None,
    model_path: str | None = None,
    rank: RankInfo | None = None,
) -> float:
    """Refuse a load of ``model_id`` that comes too soon, else record it; atomic across processes.

    Intervals left as ``None`` come from ``guard`` when one is given, else from the settings
    (an unset same-model interval is risk-scaled). An explicit value (including 0) beats the
    environment. Returns the recorded load time.
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
    return guard.require_clear(model_id, now=now, model_path=model_path, rank=rank)


def clear_for_load(model_id: str, *, model_path: str | None = None,
                   settings: Settings | None = None, **wait_options: Any) -> float:
    """The cadence step of a guarded load: rank-aware, with the interactive countdown.

    See :func:`metal_guard.cadence_wait.clear_or_wait` for ``wait_options``.
    """
    from metal_guard.cadence_wait import clear_or_wait

    return clear_or_wait(model_id, model_path=model_path, settings=settings, **wait_options)
