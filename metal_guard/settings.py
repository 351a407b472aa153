"""The one place that reads the environment.

:func:`get_settings` builds a frozen :class:`Settings` from keyword overrides, then
``METALGUARD_*`` / ``MLX_*`` environment variables, then defaults, when it is called:
nothing is frozen at import, so a test or an operator can change the environment and the
next call sees it. The common call (no arguments) is answered from memory while the raw
text of every variable it reads is unchanged, which costs a couple of microseconds instead
of the ~60 us of a full parse. Every variable is parsed and validated here; a bad value raises
:class:`~metal_guard.errors.SettingsError` naming the variable and the accepted form, except
the few variables documented (in ``docs/configuration.md``) as falling back with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metal_guard.errors import SettingsError

log = logging.getLogger("metal_guard.settings")

APP_NAME = "metal-guard"
DEFENSIVE = "defensive"
OBSERVER = "observer"
MODES = (DEFENSIVE, OBSERVER)

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})

def default_report_dirs() -> tuple[Path, ...]:
    """Default macOS diagnostic-report directories (system and per-user, with Retired/)."""
    home = Path.home()
    return (
        Path("/Library/Logs/DiagnosticReports"),
        Path("/Library/Logs/DiagnosticReports/Retired"),
        home / "Library/Logs/DiagnosticReports",
        home / "Library/Logs/DiagnosticReports/Retired",
    )


# --------------------------------------------------------------------------- parsers

#: Longest raw value accepted for any variable (a path list fits easily); longer is an error
#: before any parsing, so a hostile 10 MB value costs nothing and is never echoed whole.
MAX_VALUE_CHARS = 65536
#: Longest filesystem path accepted (Linux PATH_MAX; macOS allows 1024).
MAX_PATH_BYTES = 4096
#: How much of a bad value an error message or warning repeats.
SHOWN_VALUE_CHARS = 80
#: Longest adapter name accepted in METALGUARD_ADAPTERS / METALGUARD_DISABLED_ADAPTERS.
MAX_NAME_CHARS = 64


def shown_value(raw: object) -> str:
    """``raw`` as it may appear in an error message: at most :data:`SHOWN_VALUE_CHARS`
    characters, with the original length named when it was cut."""
    text = raw if isinstance(raw, str) else repr(raw)
    if len(text) <= SHOWN_VALUE_CHARS:
        return text
    return f"{text[:SHOWN_VALUE_CHARS]}...[{len(text)} chars]"


def _bad(name: str, raw: object, accepted: str) -> SettingsError:
    return SettingsError(name, shown_value(raw), accepted)


def parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE and value:
        return False
    raise _bad(name, raw, "one of 1/true/yes/on or 0/false/no/off")


def _fmt_num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Number:
    """Parser of a numeric variable with its documented range ``[minimum, maximum]``
    (``minimum`` excluded when ``allow_minimum`` is false)."""

    kind: type
    minimum: float
    maximum: float
    allow_minimum: bool = True

    @property
    def accepted(self) -> str:
        what = "a whole number" if self.kind is int else "a finite number"
        low = ">=" if self.allow_minimum else ">"
        return f"{what} {low} {_fmt_num(self.minimum)} and <= {_fmt_num(self.maximum)}"

    @property
    def range_text(self) -> str:
        low = "[" if self.allow_minimum else "("
        return f"{low}{_fmt_num(self.minimum)}, {_fmt_num(self.maximum)}]"

    def __call__(self, name: str, raw: str) -> Any:
        text = raw.strip()
        try:
            value: Any = int(text) if self.kind is int else float(text)
        except ValueError:  # also int() of more than sys.get_int_max_str_digits() digits
            raise _bad(name, raw, self.accepted) from None
        if self.kind is float and not math.isfinite(value):
            raise _bad(name, raw, self.accepted)
        too_low = value < self.minimum or (not self.allow_minimum and value == self.minimum)
        if too_low or value > self.maximum:
            raise _bad(name, raw, self.accepted)
        return value


def parse_float(name: str, raw: str, *, minimum: float = 0.0, allow_equal: bool = True,
                maximum: float = math.inf) -> float:
    return float(Number(float, minimum, maximum, allow_equal)(name, raw))


def parse_int(name: str, raw: str, *, minimum: int = 0, maximum: float = math.inf) -> int:
    return int(Number(int, minimum, maximum)(name, raw))


def parse_path(name: str, raw: str) -> Path:
    """An absolute path (``~`` expanded): a relative one would mean something else in every
    working directory, so two processes could each hold "the" lock."""
    text = raw.strip()
    accepted = "an absolute filesystem path (~ is expanded)"
    if not text or "\x00" in text:
        raise _bad(name, raw, accepted)
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # ~user that does not exist, or no home directory
        raise _bad(name, raw, accepted) from None
    if not path.is_absolute():
        raise _bad(name, raw, accepted)
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise _bad(name, raw, f"{accepted} of at most {MAX_PATH_BYTES} bytes")
    return path


def parse_paths(name: str, raw: str) -> tuple[Path, ...]:
    parts = [p for p in raw.split(os.pathsep) if p.strip()]
    if not parts:
        raise _bad(name, raw, f"one or more absolute paths separated by {os.pathsep!r}")
    return tuple(parse_path(name, p) for p in parts)


def parse_names(name: str, raw: str) -> frozenset[str]:
    """A comma-separated list of at least one adapter name (``*`` = all)."""
    accepted = "a comma-separated list of one or more adapter names (or *)"
    names = frozenset(p.strip().lower().replace("-", "_") for p in raw.split(",") if p.strip())
    if not names:  # "", " ", "," would otherwise select no adapter at all
        raise _bad(name, raw, accepted)
    for item in names:
        if item != "*" and (len(item) > MAX_NAME_CHARS or not item.isascii()
                            or not item.replace("_", "").replace(".", "").isalnum()):
            raise _bad(name, raw, accepted)
    return names


_MODE_WARNED: set[str] = set()
_MODE_WARNED_MAX = 64


def parse_mode(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value in MODES:
        return value
    # Documented fallback: a typo in the mode must not disable protection. Settings are
    # resolved many times per command, so each bad value is reported once per process.
    key = shown_value(raw)
    if key not in _MODE_WARNED:
        if len(_MODE_WARNED) < _MODE_WARNED_MAX:
            _MODE_WARNED.add(key)
        log.warning("%s=%r is not one of %s; using %r", name, key, "/".join(MODES), DEFENSIVE)
    return DEFENSIVE


#: Units of a duration (Go / Ollama spelling): ``30s``, ``5m``, ``1h30m``, ``250ms``.
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|ms|s|m|h)")
MAX_DURATION_SEC = 1e9


def duration_seconds(text: str) -> float:
    """Seconds in a duration: a number (seconds) or Go/Ollama units (``30s``, ``5m``, ``1h30m``),
    optionally signed (a negative value is returned as is). Raises ``ValueError``."""
    raw = str(text).strip()
    if not raw or len(raw) > 64:
        raise ValueError(f"not a duration: {raw[:64]!r}")
    sign = -1.0 if raw[0] == "-" else 1.0
    body = raw[1:] if raw[0] in "+-" else raw
    try:
        value = float(body)
    except ValueError:
        parts = _DURATION_PART.findall(body)
        if not parts or "".join(n + u for n, u in parts) != body:
            raise ValueError(f"not a duration: {raw!r} (e.g. 30s, 5m, 1h, 0, -1)") from None
        value = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if not math.isfinite(value):
        raise ValueError(f"not a finite duration: {raw!r}")
    if value > MAX_DURATION_SEC:
        raise ValueError(f"duration too large: {raw!r} (at most {MAX_DURATION_SEC:.0f} s)")
    return sign * value


def parse_keep_alive(name: str, raw: str) -> float:
    """A keep-alive with Ollama's semantics: seconds, ``0`` = at once, negative = never (-1.0)."""
    try:
        value = duration_seconds(raw)
    except ValueError:
        raise SettingsError(name, raw, "a duration such as 30s, 5m, 1h, 0 (unload after every "
                                       "request) or -1 (never)") from None
    return -1.0 if value < 0 else value


PROCESS_MODES = ("server", "embedded", "notebook", "cli", "subprocess_worker")


def parse_process_mode(name: str, raw: str) -> str | None:
    value = raw.strip().lower()
    if value not in PROCESS_MODES:
        raise _bad(name, raw, "one of " + "/".join(PROCESS_MODES))
    return value


FIT_LEVELS = ("strict", "balanced", "relaxed", "off")


def parse_fit_level(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in FIT_LEVELS:
        raise SettingsError(name, raw, "one of " + "/".join(FIT_LEVELS))
    return value


def parse_job_id(name: str, raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if len(value) > 100 or not all(ch.isprintable() and ch not in "|" for ch in value):
        raise SettingsError(name, raw, "up to 100 printable characters without '|'")
    return value


# --------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class _Var:
    env: str
    field: str
    parse: Any
    default: Any
    doc: str


#: Upper bounds used when a numeric row names none (every row should name its own).
DEFAULT_MAX_FLOAT = 1e6
DEFAULT_MAX_INT = 10**9
_HOUR = 3600.0
_DAY = 24 * _HOUR
_WEEK = 7 * _DAY


def _f(minimum: float = 0.0, allow_equal: bool = True, *, maximum: float = DEFAULT_MAX_FLOAT) -> Number:
    """A float variable in ``[minimum, maximum]`` (``(minimum, maximum]`` without allow_equal)."""
    return Number(float, minimum, maximum, allow_equal)


def _i(minimum: int = 0, *, maximum: int = DEFAULT_MAX_INT) -> Number:
    """A whole-number variable in ``[minimum, maximum]``."""
    return Number(int, minimum, maximum)


#: Every environment variable metal-guard reads. docs/configuration.md is generated from (and
#: tested against) this table.
VARIABLES: tuple[_Var, ...] = (
    _Var("METALGUARD_DISABLED", "disabled", parse_bool, False,
         "Kill switch: install(), autoload and the adapters do nothing; beats code."),
    _Var("METALGUARD_MODE", "mode", parse_mode, DEFENSIVE,
         "L6 posture: `defensive` refuses/cleans up, `observer` records and lets calls through. Invalid value: warning, falls back to defensive."),
    _Var("METALGUARD_HOME", "home", parse_path, None,
         "Relocates all state and cache files (state in HOME/state, cache in HOME/cache)."),
    _Var("METALGUARD_DEBUG", "debug", parse_bool, False,
         "Attach a stderr handler to the `metal_guard` logger (the library never configures logging otherwise)."),
    _Var("METALGUARD_BREADCRUMB_PATH", "breadcrumb_path", parse_path, None,
         "Breadcrumb log file (default: <state>/metal_breadcrumb.log)."),
    _Var("METALGUARD_BREADCRUMB_MAX_BYTES", "breadcrumb_max_bytes", _i(4096, maximum=10**10), 5_000_000,
         "Rotate the breadcrumb log when it grows past this size (one .1 backup kept)."),
    _Var("METALGUARD_LEGACY_DIR", "legacy_dir", parse_path, None,
         "metal-guard 0.11 state directory read once on first use (default: ~/.cache/metal-guard; the 0.11 ack is ~/.metal-guard-ack, or .metal-guard-ack in this directory when set). Never written."),
    _Var("METALGUARD_DIAGNOSTIC_REPORTS_DIRS", "diagnostic_reports_dirs", parse_paths, None,
         "os.pathsep-separated directories scanned for .panic/.ips reports (default: system and per-user DiagnosticReports incl. Retired/)."),
    # L8 lock
    _Var("MLX_LOCK_PATH", "lock_path", parse_path, None,
         "L8 lock file (default: <state>/mlx_exclusive.lock); the holder sidecar sits next to it."),
    _Var("MLX_FORCE_WAIT_SEC", "force_wait_sec", _f(maximum=_HOUR), 30.0,
         "L8 force=True: seconds to wait for the SIGTERMed holder to exit."),
    _Var("MLX_RECLAIM_COOLDOWN_SEC", "reclaim_cooldown_sec", _f(maximum=600.0), 8.0,
         "L8 force=True: sleep after reclaiming from a live holder."),
    # L9 cadence
    _Var("METALGUARD_CADENCE_MIN_INTERVAL_SEC", "cadence_min_interval_sec", _f(maximum=_DAY), None,
         "L9 seconds between two loads of the same model. Unset: scaled to the risk (model size vs. the GPU working set, registry floors; see state.md). Set: exactly this, both ways (0 = off)."),
    _Var("METALGUARD_CADENCE_INTERACTIVE_WAIT_SEC", "cadence_interactive_wait_sec", _f(maximum=_HOUR), 30.0,
         "L9 in a terminal or notebook, a cadence wait up to this long is a visible countdown instead of an error (0 = always raise)."),
    _Var("METALGUARD_CROSS_MODEL_INTERVAL", "cross_model_interval_sec", _f(maximum=_DAY), 0.0,
         "L9 minimum seconds between loads of different models (0 = off; gemma-4 keeps its 90 s floor)."),
    _Var("METALGUARD_GEMMA4_FIRSTGEN_DISABLED", "gemma4_firstgen_disabled", parse_bool, False,
         "C7: disable the flush + sleep before a gemma-4 model's first generation."),
    _Var("METALGUARD_GEMMA4_FIRSTGEN_SLEEP_SEC", "gemma4_firstgen_sleep_sec", _f(maximum=300.0), 3.0,
         "C7: sleep after the first-generation flush of a gemma-4 model."),
    # L9 breaker
    _Var("METALGUARD_BREAKER_WINDOW_SEC", "breaker_window_sec", _f(1.0, maximum=_WEEK), 3600.0,
         "L9 circuit breaker: window in which panics/crashes are counted."),
    _Var("METALGUARD_BREAKER_THRESHOLD", "breaker_panic_threshold", _i(1, maximum=10**6), 2,
         "L9 circuit breaker: failures within the window that trip it."),
    _Var("METALGUARD_BREAKER_COOLDOWN_SEC", "breaker_cooldown_sec", _f(maximum=_WEEK), 3600.0,
         "L9 circuit breaker: how long it stays open once tripped."),
    # L10 gate
    _Var("METALGUARD_PANIC_COOLDOWN_STAGE1_H", "panic_cooldown_stage1_h", _f(maximum=168.0), 2.0,
         "L10: cooldown after one GPU kernel panic in 24 h."),
    _Var("METALGUARD_PANIC_LOCKOUT_24H_N", "panic_lockout_24h_n", _i(1, maximum=10**6), 2,
         "L10: GPU panics in 24 h that cause a lockout."),
    _Var("METALGUARD_PANIC_LOCKOUT_72H_N", "panic_lockout_72h_n", _i(1, maximum=10**6), 3,
         "L10: GPU panics in 72 h that cause a lockout."),
    _Var("METALGUARD_PANIC_LOCKOUT_MAX_H", "panic_lockout_max_h", _f(maximum=720.0), 72.0,
         "L10: a lockout ends by itself this many hours after the earliest panic in the window."),
    _Var("METALGUARD_PANIC_GATE_DISABLED", "panic_gate_disabled", parse_bool, False,
         "L10 kill switch: the gate always proceeds."),
    # L11 / L12
    _Var("METALGUARD_SUBPROC_ORPHAN_THRESHOLD_SEC", "subproc_orphan_threshold_sec", _f(1.0, maximum=_WEEK), 90.0,
         "L11: a SUBPROC_PRE without SUBPROC_POST older than this is an orphan."),
    _Var("METALGUARD_SUBPROC_ORPHAN_WATCH_DISABLED", "subproc_orphan_watch_disabled", parse_bool, False,
         "L11 kill switch."),
    _Var("METALGUARD_POSTMORTEM_DISABLED", "postmortem_disabled", parse_bool, False,
         "L12 kill switch."),
    _Var("METALGUARD_POSTMORTEM_SENTINEL_H", "postmortem_sentinel_h", _f(maximum=168.0), 2.0,
         "L12: cooldown sentinel written when a postmortem finds a panic."),
    # L13
    _Var("METALGUARD_STATUS_INTERVAL_SEC", "status_interval_sec", _f(1.0, maximum=_DAY), 30.0,
         "L13: status-write daemon interval."),
    _Var("METALGUARD_STATUS_PATH", "status_path", parse_path, None,
         "L13: status snapshot file (default: <cache>/status.json)."),
    # L14
    _Var("METALGUARD_COLD_RESTART_AFTER_N", "cold_restart_after_n", _i(1, maximum=10**9), 4000,
         "L14: inferences before a worker cold restart is recommended."),
    _Var("METALGUARD_COLD_RESTART_DISABLED", "cold_restart_disabled", parse_bool, False,
         "L14 kill switch: should_cold_restart() is always False."),
    # Knowledge
    _Var("METALGUARD_ALLOW_PANIC_MODELS", "allow_panic_models", parse_bool, False,
         "Allow loading registry models with tier=panic in defensive mode."),
    # Isolation / R6
    _Var("METALGUARD_SUBPROCESS_WORKER", "subprocess_worker", parse_bool, False,
         "Set by metal-guard inside isolated workers (R6 process mode `subprocess_worker`)."),
    _Var("METALGUARD_WORKER_MAX_FOOTPRINT_GB", "worker_max_footprint_gb", _f(0.0, allow_equal=False, maximum=100_000.0), None,
         "L7: hard limit on a worker's memory footprint, enforced by the parent (default: from recommended_config)."),
    _Var("METALGUARD_WORKER_TEST_FAULTS", "worker_test_faults", parse_bool, False,
         "L7 tests only: let an isolated worker honour `_debug_fault` requests (abort, segfault, ...); needs METALGUARD_TESTING=1 too. Never set in production."),
    _Var("METALGUARD_TESTING", "testing", parse_bool, False,
         "Tests only: let this process honour the test fault variables (METALGUARD_WORKER_TEST_FAULTS, METALGUARD_TEST_SERVER_OOM_EVERY) and `metal_guard.testing` hooks; the pytest plugin enables the hooks in the test process itself. Never set in production."),
    _Var("METALGUARD_PROCESS_MODE", "process_mode", parse_process_mode, None,
         "R6: force the process mode (server/embedded/notebook/cli/subprocess_worker) instead of detecting it."),
    # Integration
    _Var("METALGUARD_AUTOLOAD", "autoload", parse_bool, False,
         "Zero-code activation: the shipped .pth boot module calls install() only when this is 1."),
    _Var("METALGUARD_ANNOUNCE", "announce", parse_bool, False,
         "Write one stderr line when the first adapter patches (version, pid, what is guarded). `metal-guard run` sets it; `run -q` clears it."),
    _Var("METALGUARD_ADAPTERS", "adapters", parse_names, None,
         "Comma-separated adapters to enable (default: all of mlx_lm, mlx_lm_server, mlx_vlm, mlx_vlm_server, langchain)."),
    _Var("METALGUARD_DISABLED_ADAPTERS", "disabled_adapters", parse_names, frozenset(),
         "Comma-separated adapters to disable (`*` = all)."),
    _Var("METALGUARD_STRICT", "strict", parse_bool, False,
         "install(): raise when a requested adapter's targets moved instead of marking it degraded."),
    _Var("METALGUARD_REBIND_ALIASES", "rebind_aliases", parse_bool, False,
         "install(): also rebind aliases of patched functions held in user modules."),
    _Var("METALGUARD_FLUSH_EVERY_N", "flush_every_n", _i(0, maximum=10**9), 50,
         "Adapters: flush the MLX cache every N guarded generate calls (0 = off)."),
    _Var("METALGUARD_FIT_CHECK", "fit_check", parse_bool, True,
         "Adapters: check that a model fits before loading it."),
    _Var("METALGUARD_FIT_LEVEL", "fit_level", parse_fit_level, "balanced",
         "L4 how strict the load-time fit check is: strict / balanced / relaxed / off (see memory.md)."),
    _Var("METALGUARD_JOB_ID", "job_id", parse_job_id, None,
         "Distributed: the job key shared by the ranks of one job (default: derived from the launcher's topology); set it for multi-host jobs sharing METALGUARD_HOME."),
    _Var("METALGUARD_USE_LOCK", "use_lock", parse_bool, False,
         "Adapters: hold the L8 cross-process lock around model loads."),
    _Var("METALGUARD_CADENCE", "cadence", parse_bool, True,
         "Adapters: enforce L9 cadence between model loads."),
    _Var("METALGUARD_PROMPT_CACHE_MAX_BYTES", "prompt_cache_max_bytes", _i(0, maximum=10**14), None,
         "mlx_lm.server adapter: cap the prompt cache in bytes on every path (0/unset = off)."),
    _Var("METALGUARD_SERVER_KEEP_ALIVE", "server_keep_alive_sec", parse_keep_alive, -1.0,
         "mlx_lm.server adapter: unload the model after this long without requests (30s, 5m, 1h; 0 = after every request; -1 = never). A request's `keep_alive` field overrides it, as in Ollama."),
    _Var("METALGUARD_SERVER_UNLOAD_ON_PRESSURE", "server_unload_on_pressure", parse_bool, False,
         "mlx_lm.server adapter: also unload the model early when memory pressure turns high (warn/critical) while no request is in flight."),
    _Var("METALGUARD_TEST_SERVER_OOM_EVERY", "test_server_oom_every", _i(0, maximum=10**9), 0,
         "mlx_lm.server adapter, tests only: every N-th request fails with a simulated Metal OOM (0 = off); needs METALGUARD_TESTING=1 (or the pytest plugin) too. Never set in production."),
    # mlx-safe-python
    _Var("MLX_SAFE_PYTHON_BIN", "safe_python_bin", parse_path, None,
         "mlx-safe-python: the interpreter to run (default: the running one)."),
    _Var("MLX_SAFE_PYTHON_FORCE", "safe_python_force", parse_bool, False,
         "mlx-safe-python: run even during a cooldown (with a warning)."),
)

_BY_FIELD = {v.field: v for v in VARIABLES}


@dataclass(frozen=True)
class Settings:
    """Resolved configuration. Build it with :func:`get_settings`; never mutate it."""

    disabled: bool = False
    mode: str = DEFENSIVE
    home: Path | None = None
    debug: bool = False
    breadcrumb_path: Path | None = None
    breadcrumb_max_bytes: int = 5_000_000
    diagnostic_reports_dirs: tuple[Path, ...] | None = None
    legacy_dir: Path | None = None
    lock_path: Path | None = None
    force_wait_sec: float = 30.0
    reclaim_cooldown_sec: float = 8.0
    cadence_min_interval_sec: float | None = None
    cadence_interactive_wait_sec: float = 30.0
    cross_model_interval_sec: float = 0.0
    gemma4_firstgen_disabled: bool = False
    gemma4_firstgen_sleep_sec: float = 3.0
    breaker_window_sec: float = 3600.0
    breaker_panic_threshold: int = 2
    breaker_cooldown_sec: float = 3600.0
    panic_cooldown_stage1_h: float = 2.0
    panic_lockout_24h_n: int = 2
    panic_lockout_72h_n: int = 3
    panic_lockout_max_h: float = 72.0
    panic_gate_disabled: bool = False
    subproc_orphan_threshold_sec: float = 90.0
    subproc_orphan_watch_disabled: bool = False
    postmortem_disabled: bool = False
    postmortem_sentinel_h: float = 2.0
    status_interval_sec: float = 30.0
    status_path: Path | None = None
    cold_restart_after_n: int = 4000
    cold_restart_disabled: bool = False
    allow_panic_models: bool = False
    subprocess_worker: bool = False
    worker_max_footprint_gb: float | None = None
    worker_test_faults: bool = False
    testing: bool = False
    process_mode: str | None = None
    autoload: bool = False
    announce: bool = False
    adapters: frozenset[str] | None = None
    disabled_adapters: frozenset[str] = field(default_factory=frozenset)
    strict: bool = False
    rebind_aliases: bool = False
    flush_every_n: int = 50
    fit_check: bool = True
    fit_level: str = "balanced"
    job_id: str | None = None
    use_lock: bool = False
    cadence: bool = True
    prompt_cache_max_bytes: int | None = None
    test_server_oom_every: int = 0
    server_keep_alive_sec: float = -1.0
    server_unload_on_pressure: bool = False
    safe_python_bin: Path | None = None
    safe_python_force: bool = False
    #: Names of the fields that came from the environment (for `doctor`).
    from_env: frozenset[str] = field(default_factory=frozenset, compare=False)

    # ------------------------------------------------------------------ derived paths

    @property
    def state_dir(self) -> Path:
        """Durable state: lock, breaker, cadence, ledger, breadcrumbs, ack, sentinel."""
        if self.home is not None:
            return self.home / "state"
        return _platform_dir("state")

    @property
    def cache_dir(self) -> Path:
        """Disposable data: status.json, the demo model."""
        if self.home is not None:
            return self.home / "cache"
        return _platform_dir("cache")

    @property
    def report_dirs(self) -> tuple[Path, ...]:
        if self.diagnostic_reports_dirs is not None:
            return self.diagnostic_reports_dirs
        return default_report_dirs()

    @property
    def resolved_lock_path(self) -> Path:
        return self.lock_path or self.state_dir / "mlx_exclusive.lock"

    @property
    def resolved_breadcrumb_path(self) -> Path:
        return self.breadcrumb_path or self.state_dir / "metal_breadcrumb.log"

    @property
    def resolved_status_path(self) -> Path:
        return self.status_path or self.cache_dir / "status.json"

    def state_file(self, name: str) -> Path:
        return self.state_dir / name

    def cache_file(self, name: str) -> Path:
        return self.cache_dir / name

    @property
    def is_defensive(self) -> bool:
        return self.mode == DEFENSIVE

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


#: What platformdirs reads to place the user state and cache directories (macOS: the home
#: directory; Linux: the XDG variables, else the home directory).
_PLATFORM_ENV = ("HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME")
_platform_dirs: dict[tuple[str | None, ...], Path] = {}


def _platform_dir(kind: str) -> Path:
    """platformdirs' user state or cache directory of metal-guard, remembered per value of
    the variables it depends on (one platformdirs call costs ~20 us, and a breadcrumb needs
    five)."""
    key = (kind, *map(os.environ.get, _PLATFORM_ENV))
    found = _platform_dirs.get(key)
    if found is None:
        import platformdirs

        where = platformdirs.user_state_dir if kind == "state" else platformdirs.user_cache_dir
        found = Path(where(APP_NAME, appauthor=False))
        if len(_platform_dirs) >= 16:  # a test suite that keeps changing HOME
            _platform_dirs.clear()
        _platform_dirs[key] = found
    return found


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(Settings)) - {"from_env"}


def get_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Resolve settings now: ``overrides`` > ``env`` (default ``os.environ``) > defaults.

    Unknown keyword names raise ``TypeError``; an invalid environment value raises
    :class:`SettingsError`. Overrides are taken as given (already typed), except that path
    overrides must be absolute too (``~`` is expanded). The kill switch
    ``METALGUARD_DISABLED=1`` in the environment wins over ``disabled=False`` in code.

    The common call (no ``env``, no overrides) returns the same frozen object as long as the
    raw text of every variable this module reads is unchanged (see :func:`_environ_snapshot`):
    a change made through ``os.environ`` is seen by the next call, and an invalid value is
    never remembered, so it raises again on every call.
    """
    global _last
    if env is None and not overrides:
        snapshot = _environ_snapshot()
        last = _last
        if last is not None and last[0] == snapshot:
            return last[1]
        settings = _resolve(_snapshot_env(snapshot), {})
        if _environ_snapshot() == snapshot:  # unchanged while we parsed: safe to remember
            _last = (snapshot, settings)
        return settings
    return _resolve(os.environ if env is None else env, overrides)


#: Variables outside the table that change how a value parses: ``~`` in a path expands
#: with ``HOME``.
_ALSO_READ = ("HOME",)
_READ_NAMES = (*(v.env for v in VARIABLES), *_ALSO_READ)
_encoded_names: tuple[Any, tuple[bytes, ...]] | None = None
#: ``(snapshot, settings)`` of the last common call (replaced whole, never mutated).
_last: tuple[tuple[Any, ...], Settings] | None = None


def _environ_snapshot() -> tuple[Any, ...]:
    """The raw value (or ``None``) of every variable :func:`get_settings` reads, in
    :data:`_READ_NAMES` order: the cache key of the common call.

    ``os.environ.get`` costs about a microsecond per absent name (it raises and catches a
    ``KeyError``), so for the standard ``os._Environ`` the values are looked up as bytes in
    the dict behind it, which is what ``os.environ[...] = ...``, ``del os.environ[...]`` and
    ``monkeypatch.setenv`` update. Any other object in ``os.environ`` is read through
    ``.get``. A value changed only with ``os.putenv`` is invisible either way, as it is to
    ``os.environ`` itself.
    """
    global _encoded_names
    environ = os.environ
    data = getattr(environ, "_data", None)
    if type(environ) is os._Environ and type(data) is dict:
        encode: Any = environ.encodekey  # a plain function stored on the instance
        names = _encoded_names
        if names is None or names[0] is not encode:
            names = _encoded_names = (encode, tuple(encode(name) for name in _READ_NAMES))
        return tuple(map(data.get, names[1]))
    return tuple(map(environ.get, _READ_NAMES))


def _snapshot_env(snapshot: tuple[Any, ...]) -> dict[str, str]:
    """The variables present in ``snapshot`` as text, exactly as ``os.environ`` decodes them."""
    decode = getattr(os.environ, "decodevalue", None)
    env: dict[str, str] = {}
    for name, raw in zip(_READ_NAMES, snapshot, strict=True):
        if raw is None:
            continue
        env[name] = decode(raw) if isinstance(raw, bytes) and decode is not None else raw
    return env


def _resolve(source: Mapping[str, str], overrides: dict[str, Any]) -> Settings:
    unknown = set(overrides) - _FIELD_NAMES
    if unknown:
        raise TypeError(f"unknown metal-guard setting(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    from_env: set[str] = set()
    for var in VARIABLES:
        raw = source.get(var.env)
        if raw is None:
            continue
        if var.field in overrides and var.field != "disabled":
            continue  # code beats env, except for the kill switch
        values[var.field] = parse_value(var, raw)
        from_env.add(var.field)
    for key, value in overrides.items():
        if key == "disabled" and values.get("disabled"):
            continue
        values[key] = _checked_override(key, value)
    if "mode" in overrides and overrides["mode"] not in MODES:
        raise SettingsError("mode", overrides["mode"], " or ".join(MODES))
    if "fit_level" in overrides and overrides["fit_level"] not in FIT_LEVELS:
        raise SettingsError("fit_level", overrides["fit_level"], " or ".join(FIT_LEVELS))
    return Settings(**values, from_env=frozenset(from_env))


#: The one variable whose bad (or empty) value falls back, with a warning, instead of failing.
FALLBACK_VARIABLES = frozenset({"METALGUARD_MODE"})


def parse_value(var: _Var, raw: str) -> Any:
    """``raw`` (the environment's text for ``var``) parsed and checked.

    Shared rules before the variable's own parser: a value longer than
    :data:`MAX_VALUE_CHARS` is refused unparsed, and an empty or blank value is an error
    (unset the variable to get the default). The fallback variables (``METALGUARD_MODE``)
    never fail: their parser warns and falls back to the safe value.
    """
    if var.env in FALLBACK_VARIABLES:
        return var.parse(var.env, raw)
    if len(raw) > MAX_VALUE_CHARS:
        raise _bad(var.env, raw, f"a value of at most {MAX_VALUE_CHARS} characters")
    if not raw.strip():
        raise _bad(var.env, raw, "a non-empty value (unset the variable to get the default)")
    return var.parse(var.env, raw)


def _checked_override(key: str, value: Any) -> Any:
    """Keyword overrides are typed already; paths still must be absolute (``~`` expanded)."""
    var = _BY_FIELD.get(key)
    if var is None or value is None:
        return value
    if var.parse is parse_path:
        return _absolute(key, value)
    if var.parse is parse_paths:
        return tuple(_absolute(key, item) for item in value)
    return value


def _absolute(key: str, value: Any) -> Path:
    try:
        path = Path(os.fspath(value)).expanduser()
    except (TypeError, RuntimeError):
        raise _bad(key, value, "an absolute path (~ is expanded)") from None
    if not path.is_absolute():
        raise _bad(key, value, "an absolute path (~ is expanded)")
    return path


def settings_or_current(settings: Settings | None = None) -> Settings:
    """``settings`` when given, else the settings in force now (for ``settings=`` parameters)."""
    return settings if settings is not None else get_settings()


def describe_variables() -> list[dict[str, str]]:
    """The table of variables that docs/configuration.md is generated from
    (``tools/gen_config_doc.py``; ``accepted``: the form and, for numbers, the range a value
    must have). Documentation only: the ``doc`` column is never printed by the CLI or put in
    an error message, so it may name the design's layers (L8, R6 ...)."""
    return [
        {"variable": v.env, "setting": v.field, "default": _fmt_default(v.default),
         "accepted": _accepted(v), "doc": v.doc}
        for v in VARIABLES
    ]


def _accepted(var: _Var) -> str:
    parse = var.parse
    if isinstance(parse, Number):
        return ("integer " if parse.kind is int else "number ") + parse.range_text
    return {
        parse_bool: "boolean", parse_mode: "defensive/observer",
        parse_path: "absolute path", parse_paths: "absolute paths",
        parse_names: "adapter names", parse_process_mode: "/".join(PROCESS_MODES),
    }.get(parse, "text")


def _fmt_default(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, frozenset):
        return ",".join(sorted(value)) or "(empty)"
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)
