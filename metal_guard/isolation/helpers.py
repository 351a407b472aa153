"""B1/C7 helpers used around each generation inside a worker (seed semantics).

* :func:`subprocess_inference_guard` — PRE: release MLX's buffer cache and write a durable
  ``SUBPROC_PRE`` breadcrumb; POST (always): wait for queued GPU work, release the cache
  again and write ``SUBPROC_POST``. A PRE without its POST is what the L11 orphan scan looks
  for, so both lines carry the worker's ``pid`` and ``create_time``.
* :func:`gemma4_generation_flush` — before the *first* generation of a gemma-4 family model:
  synchronize, clear the cache and sleep a few seconds (``GEMMA4_FLUSH`` /
  ``GEMMA4_FLUSH_DONE`` breadcrumbs); ``METALGUARD_GEMMA4_FIRSTGEN_DISABLED=1`` turns it off.

Every MLX step goes through :mod:`metal_guard.backend` with ``load=False``: if MLX is not
imported in this process the steps are skipped (the breadcrumbs are still written). Every
step is best-effort — a failure is logged, never raised, so the guard cannot turn a good
generation into an error.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from metal_guard import backend
from metal_guard.breadcrumbs import breadcrumb_with_meta
from metal_guard.knowledge.families import is_gemma4_family

log = logging.getLogger("metal_guard.isolation.helpers")

__all__ = [
    "gemma4_generation_flush",
    "process_create_time",
    "subprocess_inference_guard",
]

def process_create_time(pid: int) -> float | None:
    """psutil's ``create_time`` of ``pid`` (what L11 compares before signalling), or ``None``."""
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return None


def _step(label: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception as exc:
        log.warning("%s failed (ignored): %s", label, exc)


@contextmanager
def subprocess_inference_guard(model_id: str) -> Iterator[None]:
    """Wrap one generation: PRE clear + ``SUBPROC_PRE``, POST sync + clear + ``SUBPROC_POST``.

    The POST breadcrumb records ``outcome=ok`` or ``outcome=error`` (an exception propagates
    unchanged after the POST steps).
    """
    pid = os.getpid()
    meta: dict[str, Any] = {"pid": pid}
    created = process_create_time(pid)
    if created is not None:
        meta["create_time"] = f"{created:.3f}"
    _step("SUBPROC_PRE clear_cache", lambda: backend.clear_cache(load=False))
    breadcrumb_with_meta("SUBPROC_PRE", model_id, **meta)
    outcome = "error"
    try:
        yield
        outcome = "ok"
    finally:
        _step("SUBPROC_POST synchronize", lambda: backend.synchronize(load=False))
        _step("SUBPROC_POST clear_cache", lambda: backend.clear_cache(load=False))
        breadcrumb_with_meta("SUBPROC_POST", model_id, outcome=outcome, **meta)


def gemma4_generation_flush(
    model_id: str,
    generate_call_count: int,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Flush before a gemma-4 model's first generation; returns whether it flushed.

    Does nothing unless ``generate_call_count == 0`` and ``model_id`` is gemma-4 family, or
    when ``METALGUARD_GEMMA4_FIRSTGEN_DISABLED`` is set. The pause is
    ``METALGUARD_GEMMA4_FIRSTGEN_SLEEP_SEC`` (default 3 s).
    """
    from metal_guard.settings import get_settings

    if generate_call_count != 0 or not is_gemma4_family(model_id):
        return False
    settings = get_settings()
    if settings.gemma4_firstgen_disabled:
        return False
    pause = settings.gemma4_firstgen_sleep_sec
    breadcrumb_with_meta("GEMMA4_FLUSH", model_id, sleep_sec=pause, pid=os.getpid())
    _step("GEMMA4_FLUSH synchronize", lambda: backend.synchronize(load=False))
    _step("GEMMA4_FLUSH clear_cache", lambda: backend.clear_cache(load=False))
    if pause > 0:
        sleep(pause)
    breadcrumb_with_meta("GEMMA4_FLUSH_DONE", model_id, pid=os.getpid())
    return True
