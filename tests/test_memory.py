"""memory.py: real MLX counters, size estimates from real safetensors, fit checks, the ledger."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from metal_guard import backend, memory
from metal_guard.breadcrumbs import tail
from metal_guard.errors import ModelDoesNotFitError
from metal_guard.settings import get_settings

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


@pytest.mark.parametrize(
    ("name", "gb"),
    [
        ("mlx-community/Mistral-Small-3.2-24B-Instruct-2506-8bit", 24.0),
        ("mlx-community/Phi-4-mini-instruct-4bit", 2.0),
        ("mlx-community/gemma-4-26b-a4b-it-4bit", 13.0),
        ("mlx-community/gemma-4-e4b-it-4bit", None),
        ("meta-llama/Llama-3.2-3B-Instruct", 6.0),
        ("HuggingFaceTB/SmolLM-135M-Instruct-bf16", 0.27),
        ("some/model-7b-6bit", 5.25),
        ("some/model-70B-3bit", 26.25),
        ("some/model-large-2bit", 17.5),
        ("some/Qwen3-4B-mxfp4", 2.0),
        ("no-hints-at-all", None),
    ],
)
def test_estimate_from_name(name: str, gb: float | None) -> None:
    assert memory.estimate_model_size_from_name(name) == (None if gb is None else pytest.approx(gb))


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


def test_quantization_from_config() -> None:
    assert memory.quantization_from_config({"quantization": {"group_size": 64, "bits": 4}}) == "4bit"
    assert memory.quantization_from_config({"quantization_config": {"bits": 8}}) == "8bit"
    assert memory.quantization_from_config({"torch_dtype": "bfloat16"}) == "bf16"
    assert memory.quantization_from_config({}) is None


def _hf_cache(root: Path, repo: str, shards: dict[str, int], *, index_total: int | None = None,
              config: dict[str, Any] | None = None) -> Path:
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "blobs").mkdir(parents=True)
    snap = base / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("abc123")
    for i, (name, size) in enumerate(shards.items()):
        blob = base / "blobs" / f"blob{i}"
        blob.write_bytes(b"\0" * size)
        os.symlink(blob, snap / name)
    (snap / "config.json").write_text(json.dumps(config or {"quantization": {"bits": 4, "group_size": 64}}))
    if index_total is not None:
        (snap / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": index_total}}))
    return snap


def test_size_from_hf_cache_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    snap = _hf_cache(cache, "acme/Widget-7B-4bit", {"model-00001-of-00002.safetensors": 3000,
                                                    "model-00002-of-00002.safetensors": 1234})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    est = memory.estimate_model_size("acme/Widget-7B-4bit")
    assert (est.source, est.size_bytes, est.quantization, est.files) == ("hf_cache", 4234, "4bit", 2)
    assert est.path == str(snap)
    # a partially downloaded snapshot: the index knows the full size
    _hf_cache(cache, "acme/Partial-4bit", {"model-00001-of-00002.safetensors": 100}, index_total=99_000)
    assert memory.estimate_model_size("acme/Partial-4bit").size_bytes == 99_000
    # not cached: fall back to the name
    miss = memory.estimate_model_size("acme/Other-7B-8bit")
    assert (miss.source, miss.size_bytes) == ("name", 7_000_000_000)


def test_hf_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert memory.hf_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert memory.hf_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "direct"))
    assert memory.hf_cache_dir() == tmp_path / "direct"


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


def test_unknown_fit_refused_in_defensive_allowed_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelDoesNotFitError, match="cannot verify"):
        memory.require_fit(None, "model-without-hints", cleanup=Counter())
    allowed = memory.require_fit(None, "model-without-hints", on_unknown="allow")
    assert allowed.verdict == "unknown"
    with pytest.raises(ValueError):
        memory.require_fit(None, "model-without-hints", on_unknown="maybe")
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


# --------------------------------------------------------------------------- ledger


def test_ledger_round_trip_and_key() -> None:
    entry = memory.record_peak("org/Model-4bit", 5_000_000, context_tokens=4096,
                               footprint_delta_bytes=6_000_000)
    assert entry["quantization"] == "4bit"  # from the name
    assert entry["mlx_version"] == backend.mlx_version()
    assert entry["chip"] and entry["samples"] == 1
    assert entry["required_bytes"] == 6_000_000
    path = memory.ledger_path()
    assert path == get_settings().state_file("peak_ledger.json") and path.is_file()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert memory.lookup_peak("org/Model-4bit", context_tokens=4096) == entry
    again = memory.record_peak("org/Model-4bit", 3_000_000, context_tokens=4096)
    assert again["samples"] == 2 and again["peak_bytes"] == 5_000_000 and again["last_peak_bytes"] == 3_000_000
    assert len(memory.ledger_entries()) == 1


def test_ledger_lookup_rules() -> None:
    for ctx, peak in ((2048, 1_000), (8192, 4_000), (32768, 9_000)):
        memory.record_peak("org/M-8bit", peak, context_tokens=ctx)
    assert memory.lookup_peak("org/M-8bit", context_tokens=8192)["peak_bytes"] == 4_000
    assert memory.lookup_peak("org/M-8bit", context_tokens=4096)["peak_bytes"] == 4_000  # next larger
    assert memory.lookup_peak("org/M-8bit", context_tokens=65536) is None  # nothing that large
    assert memory.lookup_peak("org/M-8bit")["peak_bytes"] == 9_000  # largest when unspecified
    assert memory.lookup_peak("org/M-8bit", mlx_version="0.31.0") is None
    assert memory.lookup_peak("org/M-8bit", chip="Apple M9") is None
    assert memory.lookup_peak("org/M-8bit", quantization="4bit") is None
    assert memory.lookup_peak("org/Unknown") is None
    assert memory.forget_peaks("org/M-8bit") == 3 and memory.ledger_entries() == []


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


def test_corrupt_ledger_is_quarantined() -> None:
    path = memory.ledger_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    assert memory.ledger_entries() == []
    assert list(path.parent.glob("peak_ledger.json.corrupt-*"))
    memory.record_peak("org/A-4bit", 1)
    assert len(memory.ledger_entries()) == 1


def test_record_peak_validates() -> None:
    with pytest.raises(ValueError):
        memory.record_peak("", 1)
    with pytest.raises(ValueError):
        memory.record_peak("x", -1)


def test_measure_peak_records_a_real_peak() -> None:
    with memory.measure_peak("org/Measured-4bit", context_tokens=128) as m:
        a = mx.ones((32 * MIB // 4,), dtype=mx.float32)
        mx.eval(a)
        del a
    assert m.peak_bytes is not None and m.peak_bytes >= 32 * MIB
    assert m.entry is not None
    assert memory.lookup_peak("org/Measured-4bit", context_tokens=128)["peak_bytes"] == m.peak_bytes

    with pytest.raises(RuntimeError), memory.measure_peak("org/Failed-4bit"):
        raise RuntimeError("load failed")
    assert memory.lookup_peak("org/Failed-4bit") is None
