"""resources.py: L14 ResourceTracker precedence, kill switch, thread safety."""

from __future__ import annotations

import threading

import pytest

from metal_guard import resources
from metal_guard.resources import ResourceTracker, global_resource_tracker


def test_defaults_and_threshold() -> None:
    t = ResourceTracker(cold_restart_after=3)
    assert t.cold_restart_after == 3 and not t.should_cold_restart()
    t.record_inference()
    assert t.record_inference(2) == 3 and t.should_cold_restart()
    t.reset()
    assert t.count == 0 and not t.should_cold_restart()
    snap = t.snapshot()
    assert snap["last_restart_at_count"] == 3 and snap["restarts"] == 1
    assert set(snap) >= {"current_count", "threshold", "fraction_used", "last_restart_at_count",
                         "kill_switch_active", "resource_limit_descriptors"}
    assert ResourceTracker().cold_restart_after == 4000


def test_explicit_argument_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_COLD_RESTART_AFTER_N", "10")
    assert ResourceTracker().cold_restart_after == 10
    assert ResourceTracker(cold_restart_after=2).cold_restart_after == 2


def test_kill_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    t = ResourceTracker(cold_restart_after=1)
    t.record_inference()
    assert t.should_cold_restart()
    monkeypatch.setenv("METALGUARD_COLD_RESTART_DISABLED", "1")
    assert not t.should_cold_restart() and t.snapshot()["kill_switch_active"] is True


def test_invalid_threshold() -> None:
    for bad in (0, -5, True):
        with pytest.raises(ValueError):
            ResourceTracker(cold_restart_after=bad)
    with pytest.raises(ValueError):
        ResourceTracker().record_inference(-1)


def test_counting_is_thread_safe() -> None:
    t = ResourceTracker(cold_restart_after=10**9)

    def work() -> None:
        for _ in range(5000):
            t.record_inference()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert t.count == 20000


def test_global_tracker_is_one_object_across_threads() -> None:
    resources._reset_global_resource_tracker()
    seen: list[ResourceTracker] = []
    barrier = threading.Barrier(8)

    def grab() -> None:
        barrier.wait()
        seen.append(global_resource_tracker())

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len({id(x) for x in seen}) == 1
    resources._reset_global_resource_tracker()
