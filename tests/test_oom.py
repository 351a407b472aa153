"""oom.py on real MLX: classify, clean up, retry with ``reduce``, typed failure."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from metal_guard import backend, oom
from metal_guard.breadcrumbs import tail
from metal_guard.errors import MetalOOMError
from metal_guard.instance import MetalGuard
from metal_guard.memory import MemoryStats

mx = pytest.importorskip("mlx.core")
MIB = 1 << 20
#: The exact mlx 0.32 text (``device.cpp``), trailing period included.
METAL_OOM = ("[METAL] Command buffer execution failed: Insufficient Memory "
             "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory).")


@pytest.fixture(autouse=True)
def _big_cache() -> Iterator[None]:
    old = mx.set_cache_limit(1 << 30)  # so freed buffers stay cached and cleanup is observable
    yield
    mx.clear_cache()
    mx.set_cache_limit(old)


class Prefill:
    """Allocates like a prefill step, then fails with the Metal OOM while the step is too big."""

    def __init__(self, ok_at: int) -> None:
        self.ok_at = ok_at
        self.calls: list[dict[str, Any]] = []

    def __call__(self, prompt: str, *, prefill_step_size: int, max_kv_size: int = 4096) -> str:
        self.calls.append({"prefill_step_size": prefill_step_size, "max_kv_size": max_kv_size,
                           "cache_bytes_at_entry": mx.get_cache_memory()})
        work = mx.ones((prefill_step_size * 1024,), dtype=mx.float32)  # 4 KiB per token
        mx.eval(work)
        if prefill_step_size > self.ok_at:
            del work  # freed into MLX's cache, like a failed step's temporaries
            raise RuntimeError(METAL_OOM)
        return f"{prompt}:{prefill_step_size}:{int(work.sum().item())}"


def halve(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs["prefill_step_size"] //= 2
    return kwargs


def test_retries_with_reduce_and_real_cleanup() -> None:
    probe = Prefill(ok_at=0)
    with pytest.raises(RuntimeError):
        probe("x", prefill_step_size=4096)
    assert mx.get_cache_memory() >= 16 * MIB  # without cleanup, a failed step stays cached
    mx.clear_cache()

    guard = MetalGuard(cooldown_secs=0.0)
    fn = Prefill(ok_at=1024)
    out = guard.oom_protected(fn, "hi", max_retries=2, reduce=halve, prefill_step_size=4096)
    assert out == "hi:1024:1048576"
    assert [c["prefill_step_size"] for c in fn.calls] == [4096, 2048, 1024]
    # the first attempt left 16 MiB in the cache; the cleanup before each retry released it
    assert all(c["cache_bytes_at_entry"] == 0 for c in fn.calls[1:])
    recoveries = [c for c in tail(30) if c.tag == "OOM_RECOVERY"]
    assert [c.meta["attempt"] for c in recoveries[-2:]] == ["1", "2"]
    assert recoveries[-1].meta["error_class"] == "cmd_buffer_oom"


def test_gives_up_with_a_typed_error() -> None:
    guard = MetalGuard(cooldown_secs=0.0)
    fn = Prefill(ok_at=0)
    with pytest.raises(MetalOOMError) as info:
        guard.oom_protected(fn, "x", max_retries=1, reduce=halve, prefill_step_size=512)
    err = info.value
    assert isinstance(err, MemoryError) and isinstance(err, RuntimeError)
    assert err.attempts == 2 and len(fn.calls) == 2
    assert err.error_class is not None and err.error_class.name == "cmd_buffer_oom"
    assert isinstance(err.stats, MemoryStats) and err.stats.active_bytes is not None
    assert isinstance(err.__cause__, RuntimeError) and METAL_OOM in str(err.__cause__)
    assert mx.get_cache_memory() == 0  # cleaned up before giving up


def test_reduce_returning_none_stops_retrying() -> None:
    fn = Prefill(ok_at=0)
    with pytest.raises(MetalOOMError, match="nothing left to reduce") as info:
        oom.call_with_oom_recovery(fn, ("x",), {"prefill_step_size": 8}, max_retries=5,
                                   reduce=lambda kw: None)
    assert info.value.attempts == 1 and len(fn.calls) == 1
    with pytest.raises(TypeError):
        oom.call_with_oom_recovery(fn, ("x",), {"prefill_step_size": 8}, reduce=lambda kw: [1])  # type: ignore[arg-type,return-value]


@pytest.mark.parametrize(
    "text",
    [
        "[metal::malloc] Attempting to allocate 137438953472 bytes which is greater than the maximum allowed buffer size of 86586540032 bytes.",
        "[malloc] Unable to allocate 1073741824 bytes.",
        "cudaMallocAsync(&data, size, stream) failed: out of memory",
    ],
)
def test_other_oom_strings_are_retried(text: str) -> None:
    attempts: list[int] = []

    def fn() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError(text)
        return "ok"

    assert oom.call_with_oom_recovery(fn) == "ok" and len(attempts) == 2


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("shapes (3,) and (4,) cannot be broadcast"),
        RuntimeError("There is no Stream(gpu, 0) in current thread."),
        RuntimeError("panic(cpu 4 caller 0xfffffe): IOGPUGroupMemory.cpp:219 fPendingMemorySet"),
        RuntimeError("[METAL] Command buffer execution failed: Impacting Interactivity "
                     "(0000000e:kIOGPUCommandBufferCallbackErrorImpactingInteractivity)."),
        KeyError("x"),
    ],
)
def test_non_oom_errors_pass_through_untouched(exc: Exception) -> None:
    cleanups: list[int] = []

    def fn() -> None:
        raise exc

    with pytest.raises(type(exc)) as info:
        oom.call_with_oom_recovery(fn, cleanup=lambda: cleanups.append(1))
    assert info.value is exc and cleanups == []


def test_observer_mode_does_not_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_MODE", "observer")
    cleanups: list[int] = []
    fn = Prefill(ok_at=100)
    with pytest.raises(MetalOOMError) as info:
        oom.call_with_oom_recovery(fn, ("x",), {"prefill_step_size": 4096}, reduce=halve,
                                   cleanup=lambda: cleanups.append(1))
    assert info.value.attempts == 1 and len(fn.calls) == 1 and cleanups == []
    assert any(c.tag == "OBSERVE" and "oom_protected" in c.payload for c in tail(5))


def test_deferred_error_surfaces_at_synchronize(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlx >= 0.32 can raise the OOM one operation late; the sync after fn pins it on fn."""
    real_sync = backend.synchronize
    pending = [RuntimeError(METAL_OOM)]

    def sync(*, load: bool = False) -> bool:
        if pending:
            raise pending.pop()
        return real_sync(load=load)

    monkeypatch.setattr(backend, "synchronize", sync)
    calls: list[int] = []
    assert oom.call_with_oom_recovery(lambda: calls.append(1) or "done") == "done"
    assert len(calls) == 2


def test_seed_signature_passes_other_kwargs_to_fn() -> None:
    seen: dict[str, Any] = {}

    def fn(*, cleanup: str, settings: int, synchronize: bool) -> str:
        seen.update(cleanup=cleanup, settings=settings, synchronize=synchronize)
        return "ok"

    assert oom.oom_protected(fn, cleanup="mine", settings=3, synchronize=False) == "ok"
    assert seen == {"cleanup": "mine", "settings": 3, "synchronize": False}
    with pytest.raises(ValueError):
        oom.oom_protected(fn, max_retries=-1, cleanup="x", settings=1, synchronize=True)


def test_nested_guards_do_not_retry_twice() -> None:
    fn = Prefill(ok_at=0)

    def outer() -> str:
        return oom.call_with_oom_recovery(fn, ("x",), {"prefill_step_size": 8}, max_retries=1)

    with pytest.raises(MetalOOMError):
        oom.call_with_oom_recovery(outer, max_retries=3)
    assert len(fn.calls) == 2


def test_context_manager() -> None:
    guard = MetalGuard(cooldown_secs=0.0)
    with pytest.raises(MetalOOMError) as info, guard.oom_protected_context():
        a = mx.ones((MIB,), dtype=mx.float32)
        mx.eval(a)
        del a
        raise RuntimeError(METAL_OOM)
    assert info.value.error_class is not None and info.value.attempts == 1
    assert mx.get_cache_memory() == 0  # cleanup ran
    with pytest.raises(KeyError), guard.oom_protected_context():
        raise KeyError("not an oom")
    with guard.oom_protected_context():
        pass


def test_is_metal_oom_goes_through_the_classifier() -> None:
    assert MetalGuard.is_metal_oom(RuntimeError(METAL_OOM))
    assert not MetalGuard.is_metal_oom(RuntimeError("fPendingMemorySet"))
    assert not MetalGuard.is_metal_oom(ValueError("nope"))
