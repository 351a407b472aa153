"""``with isolated_model(model_id, **opts) as m:`` — a dedicated worker for one block.

Inside the block ``m.generate(...)`` / ``m.stream_generate(...)`` run in a worker of their
own (not the ``call_model_isolated`` pool). On exit — normal or by exception — the worker is
shut down and the GPU lock it held is released. The active runner is published in a
:class:`~contextvars.ContextVar` (:func:`current_isolated_model`) so that other layers (the
installed adapters) can route calls into it without patching anything per block. Blocks
nest: the innermost one is current, and leaving it restores the outer one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from metal_guard.isolation.runner import MLXSubprocessRunner

__all__ = ["current_isolated_model", "isolated_model"]

_CURRENT: ContextVar[MLXSubprocessRunner | None] = ContextVar(
    "metal_guard_isolated_model", default=None
)


def current_isolated_model() -> MLXSubprocessRunner | None:
    """The runner of the innermost active ``isolated_model`` block in this context, or ``None``."""
    runner = _CURRENT.get()
    return runner if runner is not None and not runner.closed else None


@contextmanager
def isolated_model(model_id: str | os.PathLike[str], **opts: Any) -> Iterator[MLXSubprocessRunner]:
    """Run ``model_id`` in a dedicated worker for the duration of the block.

    ``opts`` are :class:`MLXSubprocessRunner` options (``backend="mlx-vlm"``,
    ``generate_timeout=...``, ``max_footprint_bytes=...``, ``use_lock=...``). The worker is
    started before the block runs, so a start failure (cooldown, lock conflict, load error)
    raises at the ``with`` line.
    """
    runner = MLXSubprocessRunner(model_id, **opts)
    token = _CURRENT.set(runner)
    try:
        yield runner
    finally:
        try:
            _CURRENT.reset(token)
        except ValueError:  # exited in another context (e.g. a different task)
            _CURRENT.set(None)
        runner.shutdown()
