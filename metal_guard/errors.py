"""The metal-guard exception hierarchy.

Every exception the package raises on purpose derives from :class:`MetalGuardError`, and
also from the builtin a caller would naturally catch (``MemoryError`` for memory refusals,
``RuntimeError`` for GPU failures and refusals, ``TimeoutError`` for timeouts), so code
written against plain MLX keeps working.

Two families group what a caller handles alike:

* :class:`LoadRefused` -- a guard refused to start MLX work (cadence, breaker cooldown, panic
  gate, known-panic model, model does not fit). ``retry_after_sec`` says when a retry can
  succeed, or is ``None`` when waiting does not help.
* :class:`WorkerFailure` -- an isolated worker process failed (crash, timeout, an exception
  inside it). ``phase``, ``worker_pid`` and ``log_path`` say where, which process and where its
  log is, when known.
"""

from __future__ import annotations

import signal as _signal
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Mapping

    from metal_guard.classify import ErrorClass
    from metal_guard.lock_records import LockHolder

__all__ = [
    "AdapterError",
    "CadenceViolation",
    "CrossModelCadenceViolation",
    "GuardLayerError",
    "KnownPanicModelError",
    "LoadRefused",
    "MLXCooldownActive",
    "MLXLockConflict",
    "MetalGuardError",
    "MetalOOMError",
    "ModelDoesNotFitError",
    "PanicCooldownActive",
    "SettingsError",
    "StateFileError",
    "SubprocessCrashError",
    "SubprocessTimeoutError",
    "WorkerError",
    "WorkerFailure",
]


class MetalGuardError(Exception):
    """Base class of every error metal-guard raises on purpose."""


class LoadRefused(MetalGuardError):
    """A guard refused to start MLX work: a model load or a worker start.

    ``retry_after_sec`` is the number of seconds after which the same call can succeed (a
    cadence interval or a cooldown running out), or ``None`` when waiting alone does not help
    (a known-panic model, a model that does not fit). Each subclass also derives from the
    builtin its 0.11 counterpart did (``RuntimeError``, or ``MemoryError`` for a fit refusal).
    """

    retry_after_sec: float | None = None


def _retry_after(remaining_sec: float) -> float | None:
    return remaining_sec if remaining_sec > 0 else None


class WorkerFailure(MetalGuardError):
    """An isolated worker process failed: it crashed, timed out, or raised.

    ``phase`` is what the worker was doing (``"start"``, ``"load"``, ``"prefill"``,
    ``"generate"`` ...), ``worker_pid`` its process id and ``log_path`` the worker's log file;
    each is ``None`` when not known.
    """

    phase: str | None = None
    worker_pid: int | None = None
    log_path: str | None = None

    def _set_worker(self, phase: str | None, worker_pid: int | None,
                    log_path: str | None) -> None:
        if phase is not None:
            self.phase = phase
        if worker_pid is not None:
            self.worker_pid = worker_pid
        if log_path is not None:
            self.log_path = str(log_path)


class SettingsError(MetalGuardError, ValueError):
    """A configuration value (environment variable or keyword) is invalid.

    ``variable`` names the offending setting and ``accepted`` describes the accepted form.
    """

    def __init__(self, variable: str, value: object, accepted: str) -> None:
        self.variable = variable
        self.value = value
        self.accepted = accepted
        super().__init__(f"invalid value {value!r} for {variable}: expected {accepted}")


class StateFileError(MetalGuardError, OSError):
    """A state file or directory cannot be read or written safely.

    Raised instead of pretending the state is fresh: an unreadable breaker, cadence, sentinel
    or ledger file is a failed check, and it is never overwritten. ``path`` names the file and
    ``reason`` says what is wrong (``errno`` is set when an OS error caused it). The CLI exits 4.
    """

    def __init__(self, path: object, reason: str, *, errno: int | None = None) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"state file {self.path}: {reason}")
        self.errno = errno  # type: ignore[misc]
        self.filename = self.path  # type: ignore[misc]

    def __str__(self) -> str:
        return f"state file {self.path}: {self.reason}"


class MetalOOMError(MetalGuardError, MemoryError, RuntimeError):
    """A GPU out-of-memory condition, made catchable.

    It is both a ``MemoryError`` and a ``RuntimeError`` so that handlers written for MLX's raw
    ``RuntimeError`` and handlers written for Python's ``MemoryError`` both catch it.
    ``stats`` is a :class:`metal_guard.memory.MemoryStats` snapshot (or ``None``) and
    ``error_class`` the classifier's verdict (or ``None``).
    """

    def __init__(
        self,
        message: str,
        *,
        stats: Any = None,
        error_class: ErrorClass | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.stats = stats
        self.error_class = error_class
        self.attempts = attempts


class ModelDoesNotFitError(LoadRefused, MemoryError):
    """``require_fit`` refused a load: the model does not fit in the available GPU memory.

    ``retry_after_sec`` is ``None``: memory is freed by closing something, not by waiting.
    """

    def __init__(
        self,
        message: str,
        *,
        model_name: str = "",
        required_bytes: int | None = None,
        available_bytes: int | None = None,
    ) -> None:
        super().__init__(message)
        self.model_name = model_name
        self.required_bytes = required_bytes
        self.available_bytes = available_bytes


class CadenceViolation(LoadRefused, RuntimeError):
    """The same model was loaded less than ``min_interval`` seconds ago (L9).

    ``remaining_sec`` (= ``retry_after_sec``) is the time left until the interval has passed.
    """

    def __init__(
        self,
        model_id: str,
        *,
        last_ts: float,
        min_interval: float,
        delta: float,
        message: str | None = None,
        reason: str | None = None,
        last_pid: int | None = None,
    ) -> None:
        self.model_id = model_id
        self.last_ts = last_ts
        self.min_interval = min_interval
        self.delta = delta
        self.remaining_sec = max(0.0, min_interval - delta)
        #: Why the interval is what it is (model size, registry entry, setting), or None.
        self.reason = reason
        #: The pid that recorded the earlier load, when known.
        self.last_pid = last_pid
        self.retry_after_sec = _retry_after(self.remaining_sec)
        super().__init__(
            message
            or (
                f"cadence: {model_id!r} was loaded {delta:.1f}s ago; the minimum interval is "
                f"{min_interval:.0f}s, retry in {self.remaining_sec:.1f}s"
            )
        )


class CrossModelCadenceViolation(CadenceViolation):
    """Another model was loaded less than ``cross_model_interval`` seconds ago (L9).

    Accepts the seed's form ``(model_id, last_model, last_ts, cross_model_interval)``
    (positional or keyword); ``delta`` (seconds since ``last_ts``) defaults to "now minus
    ``last_ts``", as in the seed.
    """

    def __init__(
        self,
        model_id: str,
        last_model: str,
        last_ts: float,
        cross_model_interval: float,
        delta: float | None = None,
        message: str | None = None,
        reason: str | None = None,
        last_pid: int | None = None,
    ) -> None:
        if delta is None:
            delta = max(0.0, time.time() - float(last_ts))
        self.last_model = last_model
        self.cross_model_interval = cross_model_interval
        remaining = max(0.0, cross_model_interval - delta)
        super().__init__(
            model_id,
            last_ts=last_ts,
            min_interval=cross_model_interval,
            delta=delta,
            message=message or (
                f"cross-model cadence: {last_model!r} was loaded {delta:.1f}s ago; loading "
                f"{model_id!r} needs {cross_model_interval:.0f}s between models, retry in "
                f"{remaining:.1f}s"
            ),
            reason=reason,
            last_pid=last_pid,
        )


class MLXLockConflict(MetalGuardError, RuntimeError):
    """The cross-process MLX lock (L8) is held by another process.

    ``holder`` (a :class:`~metal_guard.lock_records.LockHolder`) describes it; a mapping given
    instead (an 0.x holder dict) is turned into one.
    """

    def __init__(self, holder: LockHolder | Mapping[str, Any] | None,
                 message: str | None = None) -> None:
        from metal_guard.lock_records import LockHolder

        if not isinstance(holder, LockHolder):
            holder = LockHolder.from_mapping(holder or {})
        self.holder: LockHolder = holder
        if message is None:
            who = f"pid {holder.pid}" if holder.pid is not None else "an unidentified process"
            message = f"MLX lock is held by {who}" + (f" ({holder.label})" if holder.label else "")
        super().__init__(message)


class MLXCooldownActive(LoadRefused, RuntimeError):
    """The circuit breaker (L9) is cooling down after a cluster of GPU panics or crashes.

    ``remaining_sec`` (= ``retry_after_sec``) is the time left until the breaker closes.
    The panic gate's refusal is the separate :class:`PanicCooldownActive`.
    """

    def __init__(
        self,
        *,
        remaining_sec: float,
        cooldown_until: float | None = None,
        panic_count: int = 0,
        window_sec: float = 0.0,
        message: str | None = None,
    ) -> None:
        self.remaining_sec = max(0.0, remaining_sec)
        self.retry_after_sec = _retry_after(self.remaining_sec)
        self.cooldown_until = cooldown_until
        self.panic_count = panic_count
        self.window_sec = window_sec
        super().__init__(
            message
            or (
                f"MLX cooldown active after {panic_count} GPU failure(s): "
                f"{self.remaining_sec:.0f}s remaining"
            )
        )


class PanicCooldownActive(LoadRefused, RuntimeError):
    """The post-reboot panic gate (L10) says MLX work must not start yet.

    ``verdict`` is the gate's :class:`~metal_guard.forensics.gate.CooldownVerdict`;
    ``remaining_sec`` (= ``retry_after_sec``), ``cooldown_until`` and ``panic_count`` (GPU
    panics in the last 72 h) are read from it. Not a subclass of the breaker's
    :class:`MLXCooldownActive`: catch :class:`LoadRefused` for both.
    """

    def __init__(self, verdict: Any) -> None:
        self.verdict = verdict
        until = getattr(verdict, "cooldown_until", None)
        remaining = getattr(verdict, "remaining_sec", None)
        self.remaining_sec = max(0.0, float(remaining or 0.0))
        self.retry_after_sec = _retry_after(self.remaining_sec)
        self.cooldown_until = float(until) if isinstance(until, int | float) else None
        self.panic_count = int(getattr(verdict, "recent_panics_72h", 0) or 0)
        self.window_sec = 0.0
        super().__init__(f"panic gate: {getattr(verdict, 'reason', 'cooldown active')}")


class KnownPanicModelError(LoadRefused, RuntimeError):
    """Loading a model listed with ``tier="panic"`` in the registry was refused.

    ``retry_after_sec`` is ``None``: the model stays refused until explicitly allowed.
    """

    def __init__(self, model_id: str, advisory: dict[str, Any] | None = None) -> None:
        self.model_id = model_id
        self.advisory = dict(advisory or {})
        hint = self.advisory.get("recommendation") or "see metal-guard check-model"
        super().__init__(
            f"{model_id!r} is a known kernel-panic model on Apple Silicon; refused in defensive "
            f"mode (allow with allow_panic_models=True or METALGUARD_ALLOW_PANIC_MODELS=1). {hint}"
        )


def signal_name(exitcode: int | None) -> str | None:
    """Return ``"SIGSEGV"`` for a process exit code of ``-11`` (and ``None`` otherwise)."""
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return _signal.Signals(-exitcode).name
    except ValueError:
        return f"SIG{-exitcode}"


class SubprocessCrashError(WorkerFailure, RuntimeError):
    """An isolated worker process died (L7).

    ``error_class`` is the classifier's verdict on the exit signal and the worker's last words;
    ``recovery_hint`` tells the caller what to do next (``respawn_now``, ``wait_lockout`` ...).
    """

    def __init__(
        self,
        model_id: str,
        exitcode: int | None,
        detail: str = "",
        *,
        signal: str | None = None,
        error_class: ErrorClass | None = None,
        phase: str | None = None,
        worker_pid: int | None = None,
        log_path: str | None = None,
    ) -> None:
        self._set_worker(phase, worker_pid, log_path)
        self.model_id = model_id
        self.exitcode = exitcode
        self.signal = signal or signal_name(exitcode)
        self.detail = detail
        if error_class is None:
            from metal_guard.classify import classify_crash

            error_class = classify_crash(exitcode, detail)
        self.error_class = error_class
        self.recovery_hint = error_class.recovery_hint if error_class else "unknown"
        how = f"signal {self.signal}" if self.signal else f"exit code {exitcode}"
        cls = f" [{error_class.name}]" if error_class else ""
        tail = f": {detail.strip().splitlines()[-1][:300]}" if detail.strip() else ""
        super().__init__(f"worker for {model_id!r} died with {how}{cls}{tail}")


class SubprocessTimeoutError(WorkerFailure, TimeoutError):
    """An isolated worker made no progress within its timeout and was killed (L7).

    ``detail`` is the tail of the worker's log at the timeout (``""`` when not read).
    """

    detail: str = ""

    def __init__(
        self,
        model_id: str,
        timeout: float,
        phase: str = "generate",
        *,
        worker_pid: int | None = None,
        log_path: str | None = None,
    ) -> None:
        self._set_worker(phase, worker_pid, log_path)
        self.model_id = model_id
        self.timeout = timeout
        super().__init__(
            f"worker for {model_id!r} made no progress for {timeout:.1f}s during {phase}; killed"
        )


class WorkerError(WorkerFailure, RuntimeError):
    """An exception raised inside an isolated worker that has no more specific mapping.

    ``exc_type`` is the worker-side type name, ``worker_traceback`` its formatted traceback
    and ``error_class`` the classifier's verdict on it (or ``None``).
    """

    error_class: ErrorClass | None = None

    def __init__(
        self,
        message: str,
        *,
        exc_type: str = "",
        worker_traceback: str = "",
        phase: str | None = None,
        worker_pid: int | None = None,
        log_path: str | None = None,
    ) -> None:
        self._set_worker(phase, worker_pid, log_path)
        self.exc_type = exc_type
        self.worker_traceback = worker_traceback
        super().__init__(message)


class GuardLayerError(MetalGuardError, RuntimeError):
    """A safety layer of metal-guard itself cannot run: its module fails to import.

    Raised in defensive mode instead of letting the call through unguarded (observer mode
    warns instead). ``layer`` is the module name and ``reason`` the import error. The fix is
    to reinstall metal-guard.
    """

    def __init__(self, layer: str, reason: str) -> None:
        self.layer = layer
        self.reason = reason
        super().__init__(
            f"metal-guard safety layer {layer} cannot be imported ({reason}); refusing to run "
            f"unguarded in defensive mode. Reinstall metal-guard (or set METALGUARD_MODE=observer "
            f"to run with a warning)."
        )


class AdapterError(MetalGuardError, RuntimeError):
    """``install(strict=True)`` could not patch a requested adapter (its targets moved)."""
