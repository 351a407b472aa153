"""L7 subprocess isolation: run MLX models in worker processes that may crash safely.

Public names (loaded lazily; importing this package imports neither MLX nor the runner):

* :class:`MLXSubprocessRunner` — a persistent worker per model (``runner.py``);
* :func:`call_model_isolated`, :func:`shutdown_all_workers` — the pooled seed API;
* :func:`isolated_model`, :func:`current_isolated_model` — a dedicated worker for a block;
* :func:`subprocess_inference_guard`, :func:`gemma4_generation_flush` — B1/C7 helpers.

The worker itself is ``python -m metal_guard.isolation.worker``; the wire format is in
``protocol.py``. See ``docs/isolation.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "MLXSubprocessRunner": "metal_guard.isolation.runner",
    "live_runners": "metal_guard.isolation.lifecycle",
    "shutdown_all_workers": "metal_guard.isolation.pool",
    "call_model_isolated": "metal_guard.isolation.pool",
    "isolated_model": "metal_guard.isolation.context",
    "current_isolated_model": "metal_guard.isolation.context",
    "subprocess_inference_guard": "metal_guard.isolation.helpers",
    "gemma4_generation_flush": "metal_guard.isolation.helpers",
    "PROTOCOL_VERSION": "metal_guard.isolation.protocol",
}

__all__ = [
    "PROTOCOL_VERSION",
    "MLXSubprocessRunner",
    "call_model_isolated",
    "current_isolated_model",
    "gemma4_generation_flush",
    "isolated_model",
    "live_runners",
    "shutdown_all_workers",
    "subprocess_inference_guard",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'metal_guard.isolation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover
    from metal_guard.isolation.context import current_isolated_model, isolated_model
    from metal_guard.isolation.helpers import gemma4_generation_flush, subprocess_inference_guard
    from metal_guard.isolation.lifecycle import live_runners
    from metal_guard.isolation.pool import call_model_isolated, shutdown_all_workers
    from metal_guard.isolation.protocol import PROTOCOL_VERSION
    from metal_guard.isolation.runner import MLXSubprocessRunner
