"""``call_model_isolated``: the seed's pooled, persistent workers keyed by (model, backend).

A runner is created on first use of a (model, backend) pair and reused afterwards; a crashed
worker is respawned by its runner on the next call. Construction (the model load) happens
outside the pool lock, so a slow load of one model never blocks calls for another. Failures
raise typed errors unless ``default=`` is given (``default=""`` restores the seed's
return-empty-on-failure behaviour).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from metal_guard.errors import MetalGuardError
from metal_guard.isolation.generation import normalize_backend
from metal_guard.isolation.runner import MLXSubprocessRunner

log = logging.getLogger("metal_guard.isolation.pool")

__all__ = ["call_model_isolated", "clear_pool", "pooled_runners", "shutdown_all_workers"]

_RAISE: Any = object()
_POOL: dict[tuple[str, str], MLXSubprocessRunner] = {}
_KEY_LOCKS: dict[tuple[str, str], threading.Lock] = {}
_POOL_LOCK = threading.Lock()


def _runner(key: tuple[str, str], options: dict[str, Any]) -> MLXSubprocessRunner:
    with _POOL_LOCK:
        runner = _POOL.get(key)
        if runner is not None and not runner.closed:
            return runner
        key_lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with key_lock:  # one construction per key; other keys proceed meanwhile
        with _POOL_LOCK:
            runner = _POOL.get(key)
            if runner is not None and not runner.closed:
                return runner
        runner = MLXSubprocessRunner(key[0], backend=key[1], **options)
        with _POOL_LOCK:
            _POOL[key] = runner
        return runner


def call_model_isolated(
    prompt: str | list[dict[str, Any]],
    model: str,
    *,
    backend: str = "mlx-lm",
    max_tokens: int = 256,
    temperature: float = 0.0,
    system: str | None = "",
    timeout: float | None = None,
    default: Any = _RAISE,
    runner_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Generate with ``model`` in a pooled, isolated worker and return the text.

    Argument order is the seed's ``(prompt, model)``. ``kwargs`` are further generation
    arguments (``top_p``, ``seed``, ``image`` ...; see :meth:`MLXSubprocessRunner.generate`);
    ``runner_options`` are used only when the pooled runner is first created. Any metal-guard
    failure (crash, timeout, cooldown, lock conflict, worker error) raises, unless
    ``default`` is given, in which case it is logged and ``default`` is returned.
    Invalid arguments always raise.
    """
    if not isinstance(model, str) or not model.strip():
        raise TypeError(f"model must be a non-empty string (argument order is (prompt, model)), "
                        f"not {model!r}")
    key = (model, normalize_backend(backend))
    try:
        runner = _runner(key, dict(runner_options or {}))
        return runner.generate(prompt, max_tokens=max_tokens, temperature=temperature,
                               system=system or None, timeout=timeout, **kwargs)
    except MetalGuardError as exc:
        if default is _RAISE:
            raise
        log.warning("call_model_isolated(%r) failed, returning the default: %s", model, exc)
        return default


def pooled_runners() -> dict[tuple[str, str], MLXSubprocessRunner]:
    """The live pooled runners by (model, backend)."""
    with _POOL_LOCK:
        return {k: r for k, r in _POOL.items() if not r.closed}


def clear_pool() -> list[MLXSubprocessRunner]:
    """Forget every pooled runner (without shutting them down); returns them."""
    with _POOL_LOCK:
        runners = list(_POOL.values())
        _POOL.clear()
        return runners


def shutdown_all_workers(timeout: float = 5.0) -> int:
    """Shut down every worker of this process — pooled or not; returns how many.

    Registered with ``atexit`` when the first runner is created.
    """
    from metal_guard.isolation.lifecycle import live_runners

    clear_pool()
    runners = live_runners()
    for runner in runners:
        try:
            runner.shutdown(timeout=timeout)
        except Exception as exc:  # pragma: no cover - best effort at exit
            log.warning("shutting down %r failed: %s", runner, exc)
    return len(runners)
