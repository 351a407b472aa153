"""memory.py: real MLX counters, pressure, headroom and fit checks (sizes from real safetensors,
the ledger); the size estimates and the ledger themselves are in test_modelsize/test_ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from metal_guard import backend, memory
from metal_guard.breadcrumbs import tail
from metal_guard.errors import ModelDoesNotFitError

mx = pytest.importorskip("mlx.core")
MIB = 1 << 20


def _no_mlx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "memory_counters", lambda *, load=True: None)


# --------------------------------------------------------------------------- MemoryStats


def test_256mib_allocation_shows_in_memory_stats() -> None:
    before = memory.memory_stats()
    a = mx.zeros((256 * MIB // 4,), dtype=mx.float32)
    mx.eval(a)
    during = memory.memory_stats()
    assert during.active_bytes is not None and before.active_bytes is not None
    assert during.active_bytes - before.active_bytes >= 256 * MIB
    assert during.peak_bytes is not None and during.peak_bytes >= 256 * MIB
    assert during.footprint_bytes is not None and during.footprint_bytes >= 256 * MIB
    assert during.used_bytes is not None and during.used_bytes >= during.active_bytes
    del a
    after = memory.memory_stats()
    assert after.active_bytes is not None and during.active_bytes - after.active_bytes >= 256 * MIB


def test_memory_stats_names_sources_and_units() -> None:
    stats = memory.memory_stats()
    assert stats.backend == "cpu"
    assert stats.limit_source == "mlx_memory_limit" and stats.limit_bytes == mx.get_memory_limit()
    assert stats.footprint_source in ("psutil_rss", "ri_phys_footprint")
    assert stats.system_total_bytes and stats.system_available_bytes
    assert stats.taken_at.tzinfo is not None
    d = stats.as_dict()
    for key in d:
        if key.endswith(("_bytes",)):
            assert d[key] is None or isinstance(d[key], int), key
    assert stats.limit_gb == pytest.approx(stats.limit_bytes / 1e9)
    assert stats.available_bytes is not None and stats.available_bytes <= stats.system_available_bytes
    assert "limit=" in stats.describe()


def test_without_mlx_limit_is_unknown_not_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_mlx(monkeypatch)
    stats = memory.memory_stats()
    assert stats.active_bytes is None and stats.limit_bytes is None
    assert stats.limit_source == "unknown"
    assert stats.available_bytes is None and stats.available_gb is None
    assert stats.used_pct is None and stats.peak_pct is None
    assert stats.footprint_bytes  # the process footprint is still real
    assert memory.is_pressure_high(0.0, stats=stats) is False
    fit = memory.check_fit(1.0, 0.0)
    assert fit.verdict == "unknown" and fit.fits is None and not fit
    assert "limit unknown" in fit.reason
    assert memory.can_fit(0.001, 0.0) is False


def test_memory_stats_math() -> None:
    s = memory.MemoryStats(active_bytes=30, peak_bytes=80, limit_bytes=100, cache_bytes=5,
                           footprint_bytes=40, system_available_bytes=1000)
    assert s.used_bytes == 40 and s.available_bytes == 60
    assert s.active_pct == 30 and s.peak_pct == 80 and s.used_pct == 40
    capped = memory.MemoryStats(active_bytes=30, peak_bytes=30, limit_bytes=100, system_available_bytes=10)
    assert capped.available_bytes == 10
    assert memory.MemoryStats(5, 5, 100).available_bytes == 95  # seed positional order
    over = memory.MemoryStats(active_bytes=150, peak_bytes=150, limit_bytes=100)
    assert over.available_bytes == 0


def test_pressure_uses_used_not_sticky_peak() -> None:
    s = memory.MemoryStats(active_bytes=10, peak_bytes=99, limit_bytes=100)
    assert memory.is_pressure_high(67.0, stats=s) is False
    assert memory.is_pressure_high(5.0, stats=s) is True
    kernel = memory.MemoryStats(active_bytes=1, peak_bytes=1, limit_bytes=100, pressure="warn")
    assert memory.is_pressure_high(99.0, stats=kernel) is True


# --------------------------------------------------------------------------- sizes


def test_size_from_tiny_models_real_safetensors(tiny_model_path: Path) -> None:
    files = list(tiny_model_path.glob("*.safetensors"))
    expected = sum(f.stat().st_size for f in files)
    est = memory.estimate_model_size(tiny_model_path)
    assert est.source == "safetensors" and est.size_bytes == expected and est.files == len(files)
    assert est.quantization == "fp32"  # torch_dtype float32 in its config.json
    fit = memory.check_fit(overhead_gb=0.5, model_name=tiny_model_path)
    assert fit.verdict == "fits" and fit.size_source == "safetensors"
    assert fit.size_bytes == expected
    assert fit.required_bytes == expected + 500_000_000


# --------------------------------------------------------------------------- require_fit


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1


def test_require_fit_defensive_cleans_up_then_refuses() -> None:
    cleanup = Counter()
    with pytest.raises(ModelDoesNotFitError) as info:
        memory.require_fit(10_000.0, "huge-model", 0.0, cleanup=cleanup)
    assert cleanup.calls == 1
    assert isinstance(info.value, MemoryError)
    assert info.value.required_bytes == 10_000 * 10**9 and info.value.available_bytes
    assert any(c.tag == "FIT_REFUSED" for c in tail(20))


def test_require_fit_escalation() -> None:
    cleanup, sleeps = Counter(), []

    def bad_cb() -> None:
        raise RuntimeError("cache clear failed")

    with pytest.raises(ModelDoesNotFitError):
        memory.require_fit(10_000.0, "huge", 0.0, cleanup=cleanup, cache_clear_cb=bad_cb,
                           escalated_cooldown_sec=1.5, sleep=sleeps.append)
    assert cleanup.calls == 2 and sleeps == [1.5]


def test_require_fit_returns_when_it_fits() -> None:
    result = memory.require_fit(0.001, "small", 0.0, cleanup=Counter())
    assert result.verdict == "fits" and result


def test_require_fit_observer_lets_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_MODE", "observer")
    cleanup = Counter()
    result = memory.require_fit(10_000.0, "huge", 0.0, cleanup=cleanup)
    assert result.verdict == "does_not_fit" and cleanup.calls == 0
    assert any(c.tag == "OBSERVE" and "require_fit" in c.payload for c in tail(10))


def test_unknown_fit_one_rule_loud_by_default_refused_at_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown size loads with a warning at the default level and is refused at strict;
    on_unknown= decides for one call; observer mode records at every level."""
    from metal_guard.breadcrumbs import tail

    cleanup = Counter()
    with pytest.warns(RuntimeWarning, match="cannot tell whether model-without-hints fits"):
        allowed = memory.require_fit(None, "model-without-hints", cleanup=cleanup)
    assert allowed.verdict == "unknown" and cleanup.calls == 0
    assert any(b.tag == "FIT_UNKNOWN" for b in tail(5))
    with pytest.raises(ModelDoesNotFitError, match=r"cannot verify.*strict"):
        memory.require_fit(None, "model-without-hints", level="strict")
    with pytest.raises(ModelDoesNotFitError, match="cannot verify"):
        memory.require_fit(None, "model-without-hints", on_unknown="refuse")
    with pytest.warns(RuntimeWarning):
        assert memory.require_fit(None, "model-without-hints", level="strict",
                                  on_unknown="allow").verdict == "unknown"
    with pytest.raises(ValueError):
        memory.require_fit(None, "model-without-hints", on_unknown="maybe")
    monkeypatch.setenv("METALGUARD_FIT_LEVEL", "strict")
    with pytest.raises(ModelDoesNotFitError):
        memory.require_fit(None, "model-without-hints")
    monkeypatch.setenv("METALGUARD_MODE", "observer")
    assert memory.require_fit(None, "model-without-hints").verdict == "unknown"


def test_negative_size_is_rejected() -> None:
    with pytest.raises(ValueError):
        memory.check_fit(-1.0)


def test_default_overhead_is_the_tier_value() -> None:
    from metal_guard.hardware import recommended_config

    fit = memory.check_fit(1.0)
    assert fit.overhead_bytes == int(recommended_config()["overhead_gb"] * 1e9)


def test_ensure_headroom_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    cleanup = Counter()
    memory.ensure_headroom("m", threshold_pct=0.0, cleanup=cleanup)
    assert cleanup.calls == 1
    memory.ensure_headroom("m", threshold_pct=100.0, cleanup=cleanup)
    assert cleanup.calls == 1
    monkeypatch.setenv("METALGUARD_MODE", "observer")
    memory.ensure_headroom("m", threshold_pct=0.0, cleanup=cleanup)
    assert cleanup.calls == 1


# --------------------------------------------------------------------------- ledger in fit checks


def test_fit_check_prefers_the_ledger(tiny_model_path: Path) -> None:
    before = memory.check_fit(overhead_gb=0.0, model_name=tiny_model_path)
    assert before.size_source == "safetensors"
    memory.record_peak(tiny_model_path, 50_000_000)
    after = memory.check_fit(overhead_gb=0.0, model_name=tiny_model_path)
    assert after.size_source == "ledger" and after.size_bytes == 50_000_000
    assert after.required_bytes == 55_000_000  # + LEDGER_MARGIN
    assert memory.check_fit(overhead_gb=0.0, model_name=tiny_model_path, use_ledger=False).size_source == "safetensors"
    huge = memory.record_peak("org/Huge-4bit", 10**15)
    assert huge and not memory.can_fit(0.001, model_name="org/Huge-4bit")


def test_the_documented_ledger_and_size_names_are_reachable_from_memory() -> None:
    """docs/memory.md lists these under ``metal_guard.memory``; the helpers it does not list
    live only in their own module (ledger, modelsize, hardware)."""
    from metal_guard import hardware, ledger, modelsize

    for name in ("record_peak", "lookup_peak", "measure_peak", "ledger_entries", "forget_peaks"):
        assert getattr(memory, name) is getattr(ledger, name), name
        assert name in memory.__all__
    for name in ("ModelSize", "estimate_model_size", "estimate_model_size_from_name"):
        assert getattr(memory, name) is getattr(modelsize, name), name
        assert name in memory.__all__
    for name, home in (("ledger_path", ledger), ("PeakMeasurement", ledger),
                       ("LEDGER_FILE", ledger), ("quantization_from_config", modelsize),
                       ("hf_cache_dir", modelsize), ("hf_snapshot_dir", modelsize),
                       ("process_footprint_bytes", hardware)):
        assert hasattr(home, name) and name not in memory.__all__, name
        assert not hasattr(memory, name), name
