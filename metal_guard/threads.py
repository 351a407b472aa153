"""MLX thread hygiene: every thread that ran MLX clears its streams before it ends.

MLX 0.32 gives each thread its own streams. When a thread that created some exits without
``mx.clear_streams()``, their C++ destructors run at thread exit without the GIL, and the
process dies at exit with ``terminate called without an active exception`` (SIGABRT) — a race
that shows under CPU contention (LangChain ``astream``/``batch``, ``asyncio.to_thread``, plain
``threading.Thread``). On macOS each such abort also leaves a crash report that the abort
scanner would count against the breaker. Two tools:

* :func:`clearing_streams` wraps the target of a thread metal-guard starts: the thread clears
  its streams on its way out, however its target ends;
* :func:`clear_streams_at_thread_exit` is called by every guarded MLX call: on a thread that
  metal-guard does not own (a LangChain executor, a user pool, ``asyncio.to_thread``) it puts a
  small object in a ``threading.local``; CPython drops a thread's locals *on that thread* as it
  ends, and the object's finaliser clears the streams there. Once per thread; the main thread
  is left to MLX's own exit handlers.

Nothing here imports MLX (:func:`metal_guard.backend.clear_streams` uses it only if loaded).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from metal_guard import backend

__all__ = ["clear_streams_at_thread_exit", "clearing_streams", "registered_here"]

F = TypeVar("F", bound=Callable[..., Any])

_local = threading.local()


class _StreamReleaser:
    """Lives in one thread's locals; clears that thread's streams when the thread ends."""

    __slots__ = ("ident",)

    def __init__(self) -> None:
        self.ident = threading.get_ident()

    def __del__(self) -> None:
        # Dropped by another thread (the local itself collected at interpreter teardown):
        # streams can only be cleared by the thread that made them, so do nothing.
        if threading.get_ident() == self.ident:
            backend.clear_streams()


def clear_streams_at_thread_exit() -> bool:
    """Arrange for the calling thread's MLX streams to be cleared when it ends.

    Returns True when it registered something now (first call on a non-main thread). Cheap on
    every later call: one thread-local attribute lookup.
    """
    if getattr(_local, "releaser", None) is not None:
        return False
    if threading.current_thread() is threading.main_thread():
        return False
    _local.releaser = _StreamReleaser()
    return True


def registered_here() -> bool:
    """True when the calling thread has a stream release pending (for tests and reports)."""
    return getattr(_local, "releaser", None) is not None


def clearing_streams(target: F) -> F:
    """Wrap a thread target so that the thread clears its MLX streams on its way out."""

    @functools.wraps(target)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return target(*args, **kwargs)
        finally:
            backend.clear_streams()

    return run  # type: ignore[return-value]
