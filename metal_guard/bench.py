"""``bench_scoped_load``: one model at a time, fully unloaded before the next.

For benchmark loops that load model after model in one process::

    with bench_scoped_load("mlx-community/Qwen3-4B-4bit") as (model, tokenizer):
        run_benchmark(model, tokenizer)
    del model, tokenizer   # the names bound by ``as`` outlive the block

Order: take the L8 cross-process lock → load (``mlx_lm.load`` or ``mlx_vlm.load``) → yield →
record the measured peak in the ledger (when the block succeeded) → ``safe_cleanup`` →
``gc.collect`` → reset the MLX peak → cool down → release the lock. The lock is taken inside the
``try``, so a failing load never leaks it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from metal_guard import backend as mlx_backend

log = logging.getLogger("metal_guard.bench")

__all__ = ["BACKENDS", "bench_scoped_load"]

#: Accepted ``backend=`` values and the library each one loads with.
BACKENDS = {"mlx-lm": "mlx_lm", "mlx": "mlx_lm", "mlx_lm": "mlx_lm", "mlx-vlm": "mlx_vlm", "mlx_vlm": "mlx_vlm"}
DEFAULT_COOLDOWN_SEC = 8.0
#: After cleanup, more MLX memory than this means something still references the model.
LEFTOVER_WARN_BYTES = 4_000_000_000
ADVISORY_CONTEXT_TOKENS = 131072


def _load(library: str, model_id: str, load_kwargs: dict[str, Any]) -> tuple[Any, Any]:
    loaded: Any
    if library == "mlx_lm":
        import mlx_lm

        loaded = mlx_lm.load(model_id, **load_kwargs)
    else:
        import mlx_vlm

        loaded = mlx_vlm.load(model_id, **load_kwargs)
    return loaded[0], loaded[1]


@contextlib.contextmanager
def bench_scoped_load(
    model_id: str, *, backend: str = "mlx-lm", lock: bool = True, lock_timeout: float | None = 0,
    label: str | None = None, cooldown_sec: float = DEFAULT_COOLDOWN_SEC,
    load_kwargs: dict[str, Any] | None = None, record_peak: bool = True,
    context_tokens: int | None = None, guard: Any = None,
    sleep: Callable[[float], Any] = time.sleep,
) -> Iterator[tuple[Any, Any]]:
    """Load ``model_id`` for the duration of the block and yield ``(model, processor)``.

    ``backend`` is ``"mlx-lm"`` (alias ``"mlx"``) or ``"mlx-vlm"``. ``guard`` defaults to the
    singleton ``metal_guard``; ``sleep`` is used for every cool-down (inject it in tests).
    """
    library = BACKENDS.get(str(backend).lower())
    if library is None:
        raise ValueError(f"backend must be one of {', '.join(sorted(BACKENDS))}; got {backend!r}")
    if cooldown_sec < 0:
        raise ValueError("cooldown_sec must be >= 0")
    if guard is None:
        from metal_guard.instance import metal_guard as guard
    from metal_guard.ledger import measure_peak

    _advise(model_id, context_tokens)
    with contextlib.ExitStack() as stack:
        if lock:
            from metal_guard.lock import mlx_exclusive_lock

            stack.enter_context(mlx_exclusive_lock(label or f"bench_scoped_load:{model_id}",
                                                   timeout=lock_timeout))
        stack.callback(_unload, guard, model_id, cooldown_sec, sleep)
        guard.breadcrumb(f"LOAD: {model_id} START backend={library}")
        with measure_peak(model_id, context_tokens=context_tokens, record=record_peak) as measured:
            model, processor = _load(library, model_id, dict(load_kwargs or {}))
            guard.breadcrumb(f"LOAD: {model_id} DONE")
            try:
                yield model, processor
            finally:
                del model, processor
        if measured.entry is not None:
            log.info("bench %s: measured peak %.3f GB", model_id, measured.entry["peak_bytes"] / 1e9)


def _advise(model_id: str, context_tokens: int | None) -> None:
    from metal_guard.prefill import describe_prefill_plan

    try:
        plan = describe_prefill_plan(context_tokens=context_tokens or ADVISORY_CONTEXT_TOKENS,
                                     model_id=model_id)
    except Exception as exc:  # advisory only
        log.debug("prefill advisory failed: %s", exc)
        return
    if plan.get("advisory") and plan.get("dims_known"):
        log.info("bench %s at %d tokens: %s", model_id, plan["context_tokens"], plan["advisory"])


def _unload(guard: Any, model_id: str, cooldown_sec: float, sleep: Callable[[float], Any]) -> None:
    guard.safe_cleanup(sleep=sleep, reason=f"bench_scoped_load:{model_id}")
    gc.collect()
    mlx_backend.reset_peak_memory(load=False)
    if cooldown_sec > 0:
        sleep(cooldown_sec)
    counters = mlx_backend.memory_counters(load=False)
    if counters is not None and counters.active_bytes > LEFTOVER_WARN_BYTES:
        log.info("after unloading %s, %.2f GB of MLX memory is still active (something still "
                 "references the model?)", model_id, counters.active_bytes / 1e9)
    guard.breadcrumb(f"UNLOAD: {model_id} DONE")
