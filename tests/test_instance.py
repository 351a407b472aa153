"""instance.py: the seed's MetalGuard class and singleton, thin and side-effect free."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from metal_guard.breadcrumbs import parse_line
from metal_guard.hardware import recommended_config
from metal_guard.instance import MetalGuard, metal_guard

SEED_METHODS = (
    "register_thread", "wait_for_threads", "flush_gpu", "safe_cleanup", "guarded_cleanup",
    "oom_protected", "oom_protected_context", "is_metal_oom", "can_fit", "require_fit",
    "memory_stats", "is_pressure_high", "ensure_headroom", "log_memory", "start_periodic_flush",
    "stop_periodic_flush", "start_watchdog", "stop_watchdog", "start_kv_cache_monitor",
    "stop_kv_cache_monitor", "breadcrumb", "breadcrumb_with_meta", "probe_metal_health",
)


def test_singleton_has_every_documented_method() -> None:
    assert isinstance(metal_guard, MetalGuard)
    for name in SEED_METHODS:
        assert callable(getattr(metal_guard, name)), name
    hw = MetalGuard.detect_hardware(load=False, include_driver=False)
    assert hw["tier"] in ("low", "mid", "high")
    assert MetalGuard.recommended_config()["watchdog_warn_pct"] > 0
    assert MetalGuard.estimate_model_size_from_name("mlx-community/Llama-3.2-3B-Instruct") == 6.0


def test_import_and_construction_have_no_side_effects(tmp_path: Path) -> None:
    code = (
        "import json, os, sys, threading\n"
        "before = threading.active_count()\n"
        "import metal_guard.instance as inst\n"
        "g = inst.MetalGuard()\n"
        "print(json.dumps({'mlx': 'mlx.core' in sys.modules, 'wrapt': 'wrapt' in sys.modules,\n"
        "  'threads': threading.active_count() - before,\n"
        "  'files': sorted(os.listdir(os.environ['METALGUARD_HOME']))}))\n"
    )
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "METALGUARD_HOME": str(home)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "mlx": False, "wrapt": False, "threads": 0, "files": []}


def test_cooldown_defaults_to_the_tier() -> None:
    assert MetalGuard().cooldown_secs == recommended_config()["cooldown_secs"]
    assert MetalGuard(cooldown_secs=0.5).cooldown_secs == 0.5
    with pytest.raises(ValueError):
        MetalGuard(cooldown_secs=-1)


def test_breadcrumb_paths(tmp_path: Path, metalguard_home: Path) -> None:
    assert metal_guard.breadcrumb("LOAD: model START") is True
    default_log = metalguard_home / "state" / "metal_breadcrumb.log"
    line = default_log.read_text().splitlines()[-1]
    parsed = parse_line(line)
    assert parsed and parsed.tag == "LOAD" and parsed.payload == "model START"

    custom = tmp_path / "custom.log"
    g = MetalGuard(breadcrumb_path=custom)
    assert g.breadcrumb_with_meta("PROBE", "x", k=1) is True
    assert "PROBE: x | k=1" in custom.read_text()
    off = MetalGuard(breadcrumb_path=None)
    assert off.breadcrumb("NOTE: hidden") is False


def test_thread_registry_and_status() -> None:
    g = MetalGuard(cooldown_secs=0.0)
    release = threading.Event()
    t = threading.Thread(target=release.wait, args=(10,), daemon=True)
    t.start()
    assert g.register_thread(t) is t
    status = g.status()
    assert status.registered_threads_alive == 1 and status["registered_threads_alive"] == 1
    assert status.as_dict() == {"mode": status.mode, "registered_threads_alive": 1,
                                "watchdog": {"running": False, "jobs": {}}}
    assert g.wait_for_threads(timeout=0.01) == 1
    release.set()
    assert g.wait_for_threads() == 0
    assert g.status()["watchdog"]["running"] is False
    assert "MetalGuard" in repr(g)


def test_memory_methods_on_real_mlx() -> None:
    mx = pytest.importorskip("mlx.core")
    g = MetalGuard(cooldown_secs=0.0)
    a = mx.zeros((64 << 20,), dtype=mx.uint8)
    mx.eval(a)
    stats = g.memory_stats()
    assert stats.active_bytes is not None and stats.active_bytes >= 64 << 20
    assert g.log_memory("test").limit_bytes == stats.limit_bytes
    assert g.is_pressure_high(threshold_pct=100.0) is False
    assert g.can_fit(0.001, 0.0) is True
    assert g.check_fit(10_000.0, 0.0).verdict == "does_not_fit"
    assert g.require_fit(0.001, "tiny", 0.0).verdict == "fits"
    assert g.probe_metal_health() is True
    del a
