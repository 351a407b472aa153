"""hardware.py: system memory and audits on captured real macOS outputs, GPU family, tiers,
footprint (real). The readers' own parsers are tested in test_macos.py."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from macos_fakes import FIX, FakeMac, fixture
from support import wait_for

from metal_guard import hardware, macos

DEVICE_INFO = json.loads((FIX / "device_info.json").read_text())


# --------------------------------------------------------------------------- system memory


def test_system_memory_from_mac_outputs() -> None:
    mem = hardware.system_memory(runner=FakeMac())
    assert mem.total_bytes == 34359738368
    assert mem.available_bytes == (45231 + 598122 + 9811) * 16384
    assert mem.swap_total_bytes == int(1.5 * 2**30)
    assert mem.swap_used_bytes == 512 * 1024
    assert (mem.pressure_level, mem.pressure, mem.pressure_source) == (1, "normal", "kernel")


def test_system_memory_critical_pressure() -> None:
    runner = FakeMac(kern__memorystatus_vm_pressure_level=fixture("sysctl_pressure_level_critical.txt"))
    mem = hardware.system_memory(runner=runner)
    assert (mem.pressure_level, mem.pressure) == (4, "critical")
    assert hardware.memory_pressure_level(runner=runner) == 4


def test_system_memory_unreadable_mac_is_unknown() -> None:
    mem = hardware.system_memory(runner=lambda argv, timeout: None)
    assert mem.total_bytes is None and mem.available_bytes is None
    assert mem.pressure == "unknown"


@pytest.mark.skipif(sys.platform == "darwin", reason="Linux path")
def test_system_memory_linux_uses_psutil() -> None:
    import psutil

    mem = hardware.system_memory()
    assert mem.total_bytes == psutil.virtual_memory().total
    assert 0 < (mem.available_bytes or 0) <= mem.total_bytes
    assert mem.pressure_level is None and mem.pressure_source == "derived"
    assert mem.pressure in ("normal", "warn", "critical")


def test_derived_pressure_thresholds() -> None:
    assert hardware._derived_pressure(100, 50) == "normal"
    assert hardware._derived_pressure(100, 9) == "warn"
    assert hardware._derived_pressure(100, 4) == "critical"
    assert hardware._derived_pressure(None, 4) == "unknown"


# --------------------------------------------------------------------------- footprint


def test_own_footprint_is_real() -> None:
    import psutil

    fp = hardware.process_footprint()
    assert fp is not None and fp.pid == os.getpid()
    rss = psutil.Process().memory_info().rss
    assert 0.5 * rss < fp.footprint_bytes < 2 * rss
    assert fp.source in ("ri_phys_footprint", "psutil_rss")


def test_footprint_of_another_pid_and_a_dead_one() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(30)"])
    try:
        wait_for(lambda: (hardware.process_footprint_bytes(child.pid) or 0) > 64 << 20,
                 what="the child's 64 MiB to show in its footprint")
    finally:
        child.kill()
        child.wait()
    assert hardware.process_footprint_bytes(child.pid) is None


# --------------------------------------------------------------------------- GPU family


@pytest.mark.parametrize(
    ("arch", "family", "generation", "variant"),
    [
        ("applegpu_g13g", "M1", 13, "base/pro"),
        ("applegpu_g13s", "M1", 13, "pro/max"),
        ("applegpu_g13d", "M1", 13, "ultra"),
        ("applegpu_g14p", "M2", 14, "phone"),
        ("applegpu_g15s", "M3", 15, "pro/max"),
        ("applegpu_g15d", "M3", 15, "ultra"),
        ("APPLEGPU_G16S", "M4", 16, "pro/max"),
        ("applegpu_g17s", "M5", 17, "pro/max"),
        ("applegpu_g13c", "M1", 13, None),
        ("applegpu_g16", "M4", 16, None),
        ("applegpu_g18s", "unknown", 18, "pro/max"),
        ("x86_64", "unknown", None, None),
        ("sm_90", "unknown", None, None),
        ("", "unknown", None, None),
        (None, "unknown", None, None),
    ],
)
def test_gpu_family_mapping(arch: str | None, family: str, generation: int | None, variant: str | None) -> None:
    assert hardware.gpu_family_from_architecture(arch) == {
        "family": family, "generation": generation, "variant": variant}


def test_apple_gpu_family_from_real_device_info() -> None:
    fam = hardware.apple_gpu_family(DEVICE_INFO["m4_max_128"])
    assert fam["available"] is True
    assert (fam["family"], fam["device_name"], fam["architecture"]) == ("M4", "Apple M4 Max", "applegpu_g16s")
    assert fam["resource_limit_descriptors"] == 499000
    assert fam["max_recommended_working_set_bytes"] == 115448725504
    assert fam["max_recommended_working_set_gb"] == pytest.approx(115.449, abs=1e-3)
    assert fam["memory_size_gb"] == pytest.approx(137.439, abs=1e-3)
    assert hardware.apple_gpu_family(DEVICE_INFO["m3_ultra_256"])["family"] == "M3"
    assert hardware.apple_gpu_family(DEVICE_INFO["m5_max_128"])["family"] == "M5"


def test_apple_gpu_family_on_this_cpu_build() -> None:
    pytest.importorskip("mlx.core")
    fam = hardware.apple_gpu_family()
    assert fam["family"] == "unknown"
    assert fam["resource_limit_descriptors"] is None
    assert hardware.apple_gpu_family({})["available"] is False


# --------------------------------------------------------------------------- tiers / hardware


@pytest.mark.parametrize(
    ("gib", "tier"),
    [(8, "low"), (16, "low"), (18, "mid"), (24, "mid"), (36, "mid"), (64, "mid"), (96, "high"),
     (128, "high"), (512, "high")],
)
def test_tier_boundaries(gib: int, tier: str) -> None:
    assert hardware.tier_for_memory(gib * 2**30)["name"] == tier


def test_unknown_memory_is_the_most_careful_tier() -> None:
    assert hardware.tier_for_memory(None)["name"] == "low"


def test_detect_hardware_on_a_mac_without_mlx_loaded() -> None:
    runner = FakeMac()
    hw = hardware.detect_hardware(runner=runner, info={})
    assert hw["memory_total_bytes"] == 34359738368 and hw["memory_total_source"] == "sysctl"
    assert hw["gpu_memory_gb"] == pytest.approx(34.36, abs=0.01)
    assert hw["tier"] == "mid"
    assert hw["chip"] == "Apple M1 Pro"
    assert hw["recommended_working_set_source"] == "estimate_75pct"
    assert hw["recommended_working_set_bytes"] == int(34359738368 * 0.75)
    assert hw["gpu_driver_version"] == "129.3.2"


def test_detect_hardware_with_metal_device_info() -> None:
    hw = hardware.detect_hardware(runner=FakeMac(), info=DEVICE_INFO["m4_max_128"])
    assert hw["tier"] == "high"
    assert hw["chip"] == "Apple M4 Max"
    assert hw["gpu_family"] == "M4"
    assert hw["recommended_working_set_bytes"] == 115448725504
    assert hw["recommended_working_set_source"] == "mlx_device_info"
    low = hardware.detect_hardware(runner=FakeMac(), info=DEVICE_INFO["m1_16"], include_driver=False)
    assert low["tier"] == "low" and low["gpu_driver_version"] is None


def test_detect_hardware_here_is_never_zero() -> None:
    hw = hardware.detect_hardware(load=False, include_driver=False)
    assert hw["memory_total_bytes"] and hw["memory_total_bytes"] > 2**30
    assert hw["tier"] == hardware.tier_for_memory(hw["memory_total_bytes"])["name"]
    assert hw["chip"]


def test_recommended_config_uses_the_tier_table() -> None:
    table = {row["name"]: row for row in json.loads(
        (Path(hardware.__file__).parent / "data" / "hardware_tiers.json").read_text())["tiers"]}
    for info, tier in ((DEVICE_INFO["m1_16"], "low"), (DEVICE_INFO["m4_pro_48"], "mid"),
                       (DEVICE_INFO["m4_max_128"], "high")):
        hw = hardware.detect_hardware(runner=FakeMac(), info=info, include_driver=False)
        cfg = hardware.recommended_config(hw)
        assert cfg["tier"] == tier
        for key in ("watchdog_warn_pct", "watchdog_critical_pct", "kv_headroom_gb",
                    "kv_growth_rate_warn", "cooldown_secs", "max_concurrent_models", "overhead_gb"):
            assert cfg[key] == table[tier][key]
    here = hardware.recommended_config()
    assert here["watchdog_warn_pct"] < here["watchdog_critical_pct"]


def test_tier_table_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    data = json.loads((Path(hardware.__file__).parent / "data" / "hardware_tiers.json").read_text())
    number = {"type": "number", "exclusiveMinimum": 0}
    schema = {
        "type": "object", "required": ["schema_version", "tiers"],
        "properties": {"schema_version": {"const": 1}, "tiers": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False,
            "required": ["name", "max_memory_gib", "watchdog_warn_pct", "watchdog_critical_pct",
                         "kv_headroom_gb", "kv_growth_rate_warn", "cooldown_secs",
                         "max_concurrent_models", "overhead_gb"],
            "properties": {"name": {"type": "string"}, "max_memory_gib": {"type": ["number", "null"]},
                           "watchdog_warn_pct": number, "watchdog_critical_pct": number,
                           "kv_headroom_gb": number, "kv_growth_rate_warn": number,
                           "cooldown_secs": {"type": "number", "minimum": 0},
                           "max_concurrent_models": {"type": "integer", "minimum": 1},
                           "overhead_gb": {"type": "number", "minimum": 0}}}}},
    }
    jsonschema.validate(data, schema)
    bounds = [t["max_memory_gib"] for t in data["tiers"]]
    assert bounds[-1] is None and bounds[:-1] == sorted(bounds[:-1])


# --------------------------------------------------------------------------- audits


def test_audit_wired_limit_default_override_unknown() -> None:
    default = hardware.audit_wired_limit(runner=FakeMac())
    assert default["mode"] == "default" and default["advisory"] is None
    assert default["limit_mb"] == 0 and default["total_bytes"] == 34359738368

    over = hardware.audit_wired_limit(runner=FakeMac(
        iogpu__wired_limit_mb=fixture("sysctl_wired_limit_override.txt")))
    assert over["mode"] == "override" and over["limit_bytes"] == 30000 * 2**20
    assert over["ratio"] == pytest.approx(30000 * 2**20 / 34359738368, abs=1e-4)
    assert over["advisory"] and "85%" in over["advisory"]

    moderate = hardware.audit_wired_limit(runner=FakeMac(iogpu__wired_limit_mb="iogpu.wired_limit_mb: 24000\n"))
    assert moderate["mode"] == "override" and moderate["advisory"] is None

    unknown = hardware.audit_wired_limit(runner=lambda argv, timeout: None)
    assert unknown["mode"] == "unknown" and unknown["limit_mb"] is None


def test_read_gpu_driver_version_fallback_chain() -> None:
    runner = FakeMac()
    assert hardware.read_gpu_driver_version(runner=runner) == "129.3.2"
    assert runner.calls[0][:2] == ["kmutil", "showloaded"]

    no_kmutil = FakeMac(kmutil=None)
    assert hardware.read_gpu_driver_version(runner=no_kmutil) == "104.6.3"
    assert [c[0] for c in no_kmutil.calls] == ["kmutil", "kextstat"]

    ioreg_only = FakeMac(kmutil=None, kextstat=fixture("kextstat_other_kext.txt"),
                         ioreg='    "CFBundleVersion" = "130.13"\n')
    assert hardware.read_gpu_driver_version(runner=ioreg_only) == "130.13"
    assert hardware.read_gpu_driver_version(runner=lambda a, t: None) is None
    assert hardware.parse_kext_version(fixture("kextstat_stderr.txt")) is None
    assert hardware.parse_kext_version("com.apple.iokit.IOGPUFamily(130.15.2)[1A2B]") == "130.15.2"


@pytest.mark.skipif(sys.platform == "darwin", reason="Linux path")
def test_linux_never_shells_out(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(argv: Sequence[str], timeout: float = 3.0) -> str | None:
        raise AssertionError(f"spawned {argv}")

    monkeypatch.setattr(macos, "run_command", boom)
    monkeypatch.setattr(subprocess, "run", boom)
    assert hardware.read_sysctl("hw.memsize") is None
    assert hardware.read_gpu_driver_version() is None
    assert hardware.memory_pressure_level() is None
    assert hardware.audit_wired_limit()["mode"] == "unknown"
    assert hardware.gpu_accelerator_stats() is None


def test_log_system_audit(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="metal_guard.hardware")
    result = hardware.log_system_audit_at_startup(runner=FakeMac(
        iogpu__wired_limit_mb=fixture("sysctl_wired_limit_override.txt")))
    assert result["gpu_driver_version"] == "129.3.2"
    assert any(r.levelno == logging.WARNING and "wired_limit_mb=30000" in r.getMessage() for r in caplog.records)
    caplog.clear()
    hardware.log_system_audit_at_startup(runner=FakeMac())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(r.levelno == logging.INFO for r in caplog.records)


def test_macos_readers_are_still_importable_from_hardware() -> None:
    for name in ("CommandRunner", "Footprint", "PRESSURE_NAMES", "gpu_accelerator_stats",
                 "memory_pressure_level", "parse_ioreg_performance_statistics", "parse_kext_version",
                 "parse_swapusage", "parse_sysctl", "parse_vm_stat", "read_sysctl", "run_command",
                 "rusage_footprint"):
        assert getattr(hardware, name) is getattr(macos, name), name
