"""L3: turn a Metal out-of-memory error into cleanup, a smaller retry, or a typed error.

Which errors count as OOM is decided by the one classifier (:func:`metal_guard.classify.is_metal_oom`):
command-buffer OOM, allocation failures and over-large buffers. Everything else — including
kernel-panic signatures and the interactivity watchdog — passes through untouched.

What MLX lets us catch depends on its version:

* **mlx <= 0.31**: a command-buffer OOM is thrown on Metal's completion queue and aborts the
  process (SIGABRT). No ``try``/``except`` can catch it; only subprocess isolation helps.
* **mlx >= 0.32**: it is a ``RuntimeError`` raised at the next synchronisation point, which can
  be one operation *after* the one that failed. :func:`oom_protected` therefore synchronises
  after the function returns, so a deferred error is attributed to (and retried with) the call
  that caused it, as far as MLX's default stream can tell.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from metal_guard import backend
from metal_guard.breadcrumbs import breadcrumb_with_meta as _crumb
from metal_guard.errors import MetalOOMError
from metal_guard.settings import Settings, get_settings

log = logging.getLogger("metal_guard.oom")

__all__ = ["call_with_oom_recovery", "oom_protected", "oom_protected_context"]

T = TypeVar("T")
Reduce = Callable[[dict[str, Any]], "dict[str, Any] | None"]



def _stats() -> Any:
    from metal_guard.memory import memory_stats

    try:
        return memory_stats(load=False)
    except Exception:  # never let the report mask the OOM
        return None


def _sync() -> None:
    """Surface a deferred (mlx >= 0.32) command-buffer error inside the protected region."""
    backend.synchronize(load=False)


def _default_cleanup() -> Callable[[], Any]:
    from metal_guard.instance import metal_guard

    return metal_guard.safe_cleanup


def oom_protected(fn: Callable[..., T], *args: Any, max_retries: int = 1,
                  reduce: Reduce | None = None, **kwargs: Any) -> T:
    """Seed form: ``fn(*args, **kwargs)`` with OOM recovery, cleaning up through the singleton's
    ``safe_cleanup``. See :func:`call_with_oom_recovery`; every other keyword goes to ``fn``."""
    return call_with_oom_recovery(fn, args, kwargs, max_retries=max_retries, reduce=reduce,
                                  cleanup=_default_cleanup())


def call_with_oom_recovery(
    fn: Callable[..., T], args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, *,
    max_retries: int = 1, reduce: Reduce | None = None, cleanup: Callable[[], Any] | None = None,
    synchronize: bool = True, settings: Settings | None = None,
) -> T:
    """Call ``fn(*args, **kwargs)``; on a Metal OOM clean up and retry up to ``max_retries`` times.

    Before each retry ``cleanup`` runs (the singleton passes ``safe_cleanup``) and, if given,
    ``reduce(kwargs)`` returns the keyword arguments for the next attempt (e.g. a halved
    ``prefill_step_size`` or a smaller ``max_kv_size``); returning ``None`` means "nothing left to
    reduce" and stops retrying. When the attempts are used up, :class:`MetalOOMError` is raised
    (``from`` the original) carrying ``stats``, ``error_class`` and ``attempts``.

    Observer mode records the OOM and raises :class:`MetalOOMError` at once, without cleanup or
    retry. Errors that are not OOM propagate unchanged.
    """
    from metal_guard.classify import classify_mlx_error, is_metal_oom

    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    settings = settings or get_settings()
    kwargs = dict(kwargs or {})
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", repr(fn))
    attempt = 0
    while True:
        attempt += 1
        try:
            result = fn(*args, **kwargs)
            if synchronize:
                _sync()
            return result
        except Exception as exc:
            if isinstance(exc, MetalOOMError) or not is_metal_oom(exc):
                raise  # not an OOM, or an inner guard already gave up
            cls = classify_mlx_error(exc)
            cls_name = cls.name if cls else "oom"
            if not settings.is_defensive:
                _crumb("OBSERVE", "oom_protected would clean up and retry", fn=name, error_class=cls_name)
                raise MetalOOMError(f"Metal OOM in {name} (observer mode: no retry): {exc}",
                                    stats=_stats(), error_class=cls, attempts=attempt) from exc
            _crumb("OOM_RECOVERY", str(exc)[:200], fn=name, attempt=attempt, error_class=cls_name)
            log.warning("Metal OOM in %s (attempt %d/%d, %s): %s", name, attempt, max_retries + 1,
                        cls_name, exc)
            if cleanup is not None:
                cleanup()
            if attempt > max_retries:
                raise MetalOOMError(f"Metal OOM in {name} after {attempt} attempt(s): {exc}",
                                    stats=_stats(), error_class=cls, attempts=attempt) from exc
            if reduce is not None:
                reduced = reduce(dict(kwargs))
                if reduced is None:
                    raise MetalOOMError(
                        f"Metal OOM in {name}; reduce() returned None (nothing left to reduce): {exc}",
                        stats=_stats(), error_class=cls, attempts=attempt) from exc
                if not isinstance(reduced, dict):
                    raise TypeError(f"reduce() must return a dict of keyword arguments, got {type(reduced).__name__}")
                log.info("retrying %s with reduced arguments: %s", name,
                         {k: v for k, v in reduced.items() if kwargs.get(k) != v})
                kwargs = reduced


@contextlib.contextmanager
def oom_protected_context(
    *, cleanup: Callable[[], Any] | None = None, synchronize: bool = True,
    settings: Settings | None = None,
) -> Iterator[None]:
    """Context-manager form (no retry): an OOM inside the block runs ``cleanup`` (default: the
    singleton's ``safe_cleanup``) and becomes
    :class:`MetalOOMError` (``from`` the original); other errors propagate unchanged. On a normal
    exit MLX is synchronised so a deferred OOM still surfaces inside the block's accounting."""
    from metal_guard.classify import classify_mlx_error, is_metal_oom

    settings = settings or get_settings()
    try:
        yield
        if synchronize:
            _sync()
    except MetalOOMError:
        raise
    except Exception as exc:
        if not is_metal_oom(exc):
            raise
        cls = classify_mlx_error(exc)
        cls_name = cls.name if cls else "oom"
        if settings.is_defensive:
            _crumb("OOM_RECOVERY", str(exc)[:200], fn="oom_protected_context", error_class=cls_name)
            (cleanup or _default_cleanup())()
        else:
            _crumb("OBSERVE", "oom_protected_context would clean up", error_class=cls_name)
        raise MetalOOMError(f"Metal OOM: {exc}", stats=_stats(), error_class=cls, attempts=1) from exc
