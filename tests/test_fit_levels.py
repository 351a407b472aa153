"""Fit levels (strict / balanced / relaxed / off): decided from what MLX can get, with the
kernel's pressure level as the tie-breaker — never from a raw free-page count by default.

The Mac is described by captured outputs (``tests/fixtures/macos``): an M4 Pro 48 GB's
``mx.device_info()``, and a *busy* ``vm_stat`` (few free/inactive pages, much purgeable and
compressed memory) read through the real parsers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from macos_fakes import FakeMac, fixture

from metal_guard import memory
from metal_guard.errors import ModelDoesNotFitError, SettingsError
from metal_guard.fit import check_fit, require_fit
from metal_guard.hardware import detect_hardware, system_memory
from metal_guard.memory import MemoryStats
from metal_guard.settings import get_settings

GB = 1_000_000_000
DEVICES = json.loads((Path(__file__).parent / "fixtures" / "macos" / "device_info.json").read_text())
M4_PRO_48 = DEVICES["m4_pro_48"]
USED = 2 * GB


def busy_mac_stats(pressure: str = "sysctl_pressure_level_normal.txt", used: int = USED) -> MemoryStats:
    mac = FakeMac(hw__memsize=f"hw.memsize: {M4_PRO_48['memory_size']}",
                  vm_stat=fixture("vm_stat_busy.txt"),
                  kern__memorystatus_vm_pressure_level=fixture(pressure))
    sysmem = system_memory(runner=mac)
    hw = detect_hardware(runner=mac, info=M4_PRO_48, include_driver=False)
    ws = hw["recommended_working_set_bytes"]
    # MLX's default memory limit on Metal: min(1.5 x working set, 0.95 x RAM) (docs/memory.md)
    mlx_limit = min(int(1.5 * ws), int(0.95 * hw["memory_total_bytes"]))
    return MemoryStats(active_bytes=used, peak_bytes=used, limit_bytes=ws,
                       limit_source="metal_recommended_working_set", mlx_limit_bytes=mlx_limit,
                       footprint_bytes=used, footprint_source="ri_phys_footprint",
                       system_total_bytes=sysmem.total_bytes,
                       system_available_bytes=sysmem.available_bytes,
                       swap_total_bytes=sysmem.swap_total_bytes, swap_used_bytes=sysmem.swap_used_bytes,
                       pressure=sysmem.pressure, pressure_level=sysmem.pressure_level, backend="metal")


def fit(size_gb: float, stats: MemoryStats, level: str) -> Any:
    return check_fit(size_gb, 0.0, stats=stats, level=level)


def test_the_fixture_is_a_busy_mac_under_normal_pressure() -> None:
    stats = busy_mac_stats()
    assert stats.pressure == "normal"
    assert stats.system_available_bytes is not None and stats.system_available_bytes < 2 * GB
    assert stats.limit_bytes == 40_200_896_512


def test_busy_vm_stat_with_normal_pressure_fits_by_default() -> None:
    stats = busy_mac_stats()
    assert get_settings().fit_level == "balanced"  # the documented default
    result = check_fit(20.0, 0.0, stats=stats)  # 20 GB: half the working set, 10x "available"
    assert result.verdict == "fits" and result.level == "balanced"
    assert result.available_bytes == 40_200_896_512 - USED
    assert fit(20.0, stats, "relaxed").verdict == "fits"
    # only strict still counts free + inactive + speculative pages, and says so
    strict = fit(20.0, stats, "strict")
    assert strict.verdict == "does_not_fit" and strict.refused_by == "system_available"
    assert "available" in strict.reason and "METALGUARD_FIT_LEVEL=balanced" in strict.reason


def test_pressure_breaks_the_tie_between_the_working_set_and_mlxs_limit() -> None:
    # 42 GB: past the working-set room (38.2 GB) but within MLX's own limit (48.96 - 2 GB)
    normal, warn = busy_mac_stats(), busy_mac_stats("sysctl_pressure_level_warn.txt")
    assert warn.pressure == "warn"
    assert fit(42.0, normal, "balanced").verdict == "fits"
    refused = fit(42.0, warn, "balanced")
    assert refused.verdict == "does_not_fit" and refused.refused_by == "pressure"
    assert "'warn'" in refused.reason and "METALGUARD_FIT_LEVEL=relaxed" in refused.reason
    assert fit(42.0, warn, "relaxed").verdict == "fits"
    # within the working set, warn pressure does not refuse (balanced); strict does
    assert fit(10.0, warn, "balanced").verdict == "fits"
    assert fit(10.0, warn, "strict").refused_by == "system_available"


def test_critical_pressure_refuses_at_balanced_and_strict_only() -> None:
    critical = busy_mac_stats("sysctl_pressure_level_critical.txt")
    assert critical.pressure == "critical"
    refused = fit(1.0, critical, "balanced")
    assert refused.verdict == "does_not_fit" and refused.refused_by == "pressure"
    assert fit(1.0, critical, "relaxed").verdict == "fits"


def test_past_mlxs_own_limit_nothing_but_off_lets_it_through() -> None:
    stats = busy_mac_stats()
    for level in ("strict", "balanced", "relaxed"):
        result = fit(60.0, stats, level)
        assert result.verdict == "does_not_fit", level
    assert fit(60.0, stats, "balanced").refused_by == "mlx_memory_limit"
    assert "MLX's memory limit" in fit(60.0, stats, "relaxed").reason
    assert "METALGUARD_FIT_LEVEL=off" in fit(60.0, stats, "relaxed").reason


def test_require_fit_names_the_number_and_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    stats = busy_mac_stats("sysctl_pressure_level_warn.txt")
    monkeypatch.setattr(memory, "memory_stats", lambda *, load=True: stats)
    with pytest.raises(ModelDoesNotFitError) as err:
        require_fit(42.0, "org/big-model", 0.0)
    text = str(err.value)
    assert "pressure 'warn'" in text and "fit level balanced" in text
    assert "METALGUARD_FIT_LEVEL=relaxed" in text and "METALGUARD_FIT_CHECK=0" in text
    # level off never refuses; the numbers are still reported
    monkeypatch.setenv("METALGUARD_FIT_LEVEL", "off")
    result = require_fit(60.0, "org/huge-model", 0.0)
    assert result.verdict == "does_not_fit" and result.level == "off"
    monkeypatch.setenv("METALGUARD_FIT_LEVEL", "relaxed")
    assert require_fit(42.0, "org/big-model", 0.0).verdict == "fits"


def test_bad_levels_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_FIT_LEVEL", "loose")
    with pytest.raises(SettingsError, match="METALGUARD_FIT_LEVEL"):
        get_settings()
    monkeypatch.delenv("METALGUARD_FIT_LEVEL")
    with pytest.raises(ValueError, match="fit level"):
        check_fit(1.0, 0.0, stats=busy_mac_stats(), level="loose")
    with pytest.raises(SettingsError):
        get_settings(fit_level="loose")


def test_cpu_build_uses_mlxs_limit_without_a_gray_zone() -> None:
    # the CPU build's limit is MLX's memory limit itself: there is nothing above it to allow
    stats = MemoryStats(active_bytes=0, limit_bytes=10 * GB, limit_source="mlx_memory_limit",
                        mlx_limit_bytes=10 * GB, system_available_bytes=1 * GB, pressure="normal")
    assert fit(8.0, stats, "balanced").verdict == "fits"
    assert fit(11.0, stats, "relaxed").refused_by == "working_set"


def test_guarded_load_follows_the_fit_level(monkeypatch: pytest.MonkeyPatch, tiny_model_path: Path) -> None:
    """A real guarded mlx_lm.load on the busy Mac: strict refuses (overhead > free pages),
    the default loads."""
    pytest.importorskip("mlx_lm")
    import mlx_lm

    from metal_guard import installer as mg
    from metal_guard import policy

    stats = busy_mac_stats()
    monkeypatch.setattr(memory, "memory_stats", lambda *, load=True: stats)
    mg.install(adapters=["mlx_lm"], cadence=False)
    try:
        with policy.scope(fit_level="strict"), pytest.raises(ModelDoesNotFitError, match="strict"):
            mlx_lm.load(str(tiny_model_path))
        model, _tok = mlx_lm.load(str(tiny_model_path))
        assert model is not None
    finally:
        mg.uninstall()
