"""cleanup.py on real MLX and real threads: registry, flush, safe_cleanup order and modes."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from metal_guard import cleanup
from metal_guard.breadcrumbs import tail
from metal_guard.cleanup import CleanupResult
from metal_guard.instance import MetalGuard

mx = pytest.importorskip("mlx.core")
MIB = 1 << 20


@pytest.fixture
def cached_buffers() -> Iterator[None]:
    """Leave a few MiB in MLX's buffer cache (the CPU allocator caches freed buffers)."""
    old = mx.set_cache_limit(1 << 30)
    arrays = [mx.ones((MIB,), dtype=mx.float32) for _ in range(4)]
    mx.eval(*arrays)
    del arrays
    assert mx.get_cache_memory() > 0
    yield
    mx.clear_cache()
    mx.set_cache_limit(old)


def blocked_thread() -> tuple[threading.Thread, threading.Event]:
    release = threading.Event()
    t = threading.Thread(target=release.wait, args=(30,), name="blocked-gpu", daemon=True)
    t.start()
    return t, release


def test_flush_gpu_empties_the_cache(cached_buffers: None) -> None:
    assert cleanup.flush_gpu() is True
    assert mx.get_cache_memory() == 0


def test_flush_gpu_without_mlx_loaded_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    from metal_guard import backend

    monkeypatch.setattr(backend, "loaded_core", lambda: None)
    assert cleanup.flush_gpu() is False


def test_safe_cleanup_from_a_registered_thread_does_not_raise(cached_buffers: None) -> None:
    guard = MetalGuard(cooldown_secs=0.0)
    outcome: dict[str, object] = {}

    def gpu_work() -> None:
        a = mx.ones((4 * MIB,), dtype=mx.float32)
        mx.eval(a)
        del a  # freed into the cache; the cleanup below must release it
        try:
            outcome["result"] = guard.safe_cleanup()
        except BaseException as exc:  # the seed's bug: RuntimeError('cannot join current thread')
            outcome["error"] = exc

    t = threading.Thread(target=gpu_work, name="gpu-worker")
    guard.register_thread(t)
    t.start()
    t.join(30)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert isinstance(result, CleanupResult)
    assert result.skipped_self is True and result.waited_alive == 0 and result.flushed is True
    assert result["flushed"] is True and result.as_dict()["skipped_self"] is True  # 0.x dict view
    assert mx.get_cache_memory() == 0


def test_wait_for_threads_uses_one_total_deadline() -> None:
    """The timeout is shared by all threads: each join gets what is left of it (a clock that
    advances 0.15 s per reading), not the full timeout again."""
    guard = MetalGuard(cooldown_secs=0.0, thread_timeout_secs=0.3)
    pairs = [blocked_thread() for _ in range(3)]
    joins: list[float | None] = []
    for t, _ in pairs:
        guard.register_thread(t)
        t.join = joins.append  # type: ignore[method-assign]  # record the timeout, do not block
    readings = iter([0.0, 0.15, 0.30, 0.45, 0.60])
    assert guard.registry.wait(0.3, clock=lambda: next(readings)) == 3
    assert joins == pytest.approx([0.15, 0.0, 0.0])  # 0.3 in total, not 3 x 0.3
    for t, _ in pairs:
        del t.join
    assert guard.wait_for_threads() == 3  # the real wait, with its real timeout
    for _, release in pairs:
        release.set()
    assert guard.wait_for_threads(timeout=10) == 0
    assert guard.registry.threads() == []


def test_registry_keeps_unstarted_threads_and_rejects_junk() -> None:
    reg = cleanup.ThreadRegistry()
    t = threading.Thread(target=lambda: None)
    reg.register(t)
    reg.register(t)
    assert reg.threads() == [t]
    t.start()
    t.join()
    assert reg.threads() == []
    with pytest.raises(TypeError):
        reg.register("not a thread")  # type: ignore[arg-type]


def test_safe_cleanup_order_and_breadcrumbs(cached_buffers: None) -> None:
    sleeps: list[float] = []
    guard = MetalGuard(cooldown_secs=1.25)
    result = guard.safe_cleanup(sleep=sleeps.append)
    assert result["flushed"] is True and sleeps == [1.25]
    crumbs = [(c.tag, c.payload) for c in tail(10) if c.tag == "CLEANUP"]
    assert crumbs[-2:] == [("CLEANUP", "START"), ("CLEANUP", "DONE")]


def test_defensive_does_not_clear_cache_while_another_gpu_thread_runs(cached_buffers: None) -> None:
    guard = MetalGuard(cooldown_secs=0.0, thread_timeout_secs=0.05)
    t, release = blocked_thread()
    guard.register_thread(t)
    try:
        result = guard.safe_cleanup()
        assert result["waited_alive"] == 1 and result["flush_skipped"] is True
        assert mx.get_cache_memory() > 0
    finally:
        release.set()
        t.join()


def test_observer_clears_anyway_and_records(cached_buffers: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_MODE", "observer")
    guard = MetalGuard(cooldown_secs=0.0, thread_timeout_secs=0.05)
    t, release = blocked_thread()
    guard.register_thread(t)
    try:
        result = guard.safe_cleanup()
        assert result["flushed"] is True and mx.get_cache_memory() == 0
        assert any(c.tag == "OBSERVE" for c in tail(10))
    finally:
        release.set()
        t.join()


def test_guarded_cleanup_runs_on_error() -> None:
    calls: list[int] = []
    with pytest.raises(ValueError), cleanup.guarded_cleanup(lambda: calls.append(1)):
        raise ValueError("boom")
    assert calls == [1]
    guard = MetalGuard(cooldown_secs=0.0)
    with guard.guarded_cleanup():
        pass
    assert any(c.tag == "CLEANUP" and c.payload == "DONE" for c in tail(5))


def test_kv_cache_clear_on_pressure(cached_buffers: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_MODE", "observer")
    assert cleanup.kv_cache_clear_on_pressure(1.0, 2.0) is False
    assert mx.get_cache_memory() > 0
    monkeypatch.setenv("METALGUARD_MODE", "defensive")
    assert cleanup.kv_cache_clear_on_pressure(None, None) is True
    assert mx.get_cache_memory() == 0


def test_flush_survives_a_deferred_mlx_error(monkeypatch: pytest.MonkeyPatch, cached_buffers: None) -> None:
    from metal_guard import backend

    def deferred(*, load: bool = False) -> bool:
        raise RuntimeError("[METAL] Command buffer execution failed: Insufficient Memory "
                           "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory).")

    monkeypatch.setattr(backend, "synchronize", deferred)
    assert cleanup.flush_gpu() is True
    assert mx.get_cache_memory() == 0
    assert any(c.tag == "FLUSH_SYNC_ERROR" and c.meta.get("error_class") == "cmd_buffer_oom" for c in tail(5))
