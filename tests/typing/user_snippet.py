"""A user's program against the public surface, type-checked with ``mypy --strict``.

Not a test module (pytest does not collect it: no ``test_`` prefix). ``.ci/run`` and
``tests/test_facade.py`` run ``mypy --strict`` on it with the installed package; every
annotation below must match the real signature, so a lazy name that type checkers cannot see
(an ``Any``) or a changed signature fails the check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import metal_guard
from metal_guard import (
    FitResult,
    LoadRefused,
    MemoryStats,
    MetalOOMError,
    MLXSubprocessRunner,
    WorkerFailure,
    bench_scoped_load,
    check_fit,
    guarded_generate,
    install,
    isolated_model,
    memory_stats,
    mlx_exclusive_lock,
    read_mlx_lock,
)
from metal_guard.lock import LockHolder


def headroom_bytes() -> int | None:
    stats: MemoryStats = memory_stats(load=False)
    if stats.limit_bytes is None or stats.active_bytes is None:
        return None
    return stats.limit_bytes - stats.active_bytes


def fits(model: str) -> bool | None:
    result: FitResult = check_fit(model_name=model, context_tokens=4096)
    needed: int | None = result.required_bytes
    return result.fits if needed is not None else None


@guarded_generate
def answer(prompt: str, max_tokens: int = 64) -> str:
    return prompt[:max_tokens]


@guarded_generate(oom_retries=1)
def answer_with_retry(prompt: str) -> str:
    return prompt


def in_a_worker(model: str, prompt: str) -> str:
    runner: MLXSubprocessRunner
    with isolated_model(model, generate_timeout=60.0) as runner:
        text: str = runner.generate(prompt, max_tokens=32)
    return text


def lock_holder_pid() -> int | None:
    holder: LockHolder | None = read_mlx_lock()
    if holder is None or not holder.verified:
        return None
    return holder.pid


def under_the_lock(label: str) -> bool:
    with mlx_exclusive_lock(label, timeout=5.0) as info:
        took: bool = info.acquired
        return took and info.lock_path is not None


def benchmark(model: str, run: Callable[[Any, Any], float]) -> float:
    with bench_scoped_load(model, cooldown_sec=0.0) as (weights, processor):
        return run(weights, processor)


def main(model: str) -> int:
    report = install(adapters=["mlx_lm"])
    if not report.installed or report.adapters["mlx_lm"].state == "failed":
        return 1
    try:
        print(in_a_worker(model, answer("hello", max_tokens=8)))
    except LoadRefused as exc:
        wait: float | None = exc.retry_after_sec
        print(f"refused, retry in {wait}s" if wait is not None else f"refused: {exc}")
        return 2
    except WorkerFailure as exc:
        where: str | None = exc.phase
        pid: int | None = exc.worker_pid
        log: str | None = exc.log_path
        print(f"worker {pid} failed during {where}; log at {log}")
        return 3
    except MetalOOMError:
        return 4
    finally:
        metal_guard.uninstall()
    return 0 if fits(model) is not False and headroom_bytes() != 0 else 5
