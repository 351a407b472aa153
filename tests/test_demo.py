"""``metal-guard demo``: the real command, end to end (tiny models, real worker processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mlx_lm")

from report_factory import write_panic

STEPS = ["models", "load_drafter", "load_reviewer", "generate", "isolated", "crash", "status"]


def demo(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "metal_guard", "demo", *args],
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def _state_files(home: Path) -> set[str]:
    state = home / "state"
    return {p.name for p in state.iterdir()} if state.is_dir() else set()


def test_demo_text_then_json(metalguard_home: Path) -> None:
    started = time.monotonic()
    proc = demo()
    first_wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for n in range(1, 8):
        assert f"[{n}/7]" in out
    assert out.count(" ok ") >= 7 and "FAILED" not in out
    assert "refused by the cross-model cadence" in out
    assert "died by SIGABRT" in out and "respawned" in out
    assert "Status report" in out and "breaker      closed: 1 worker crash(es)" in out
    assert "LOAD: START model=lm" in out
    assert "Done in" in out
    assert first_wall < 60.0
    assert "Fatal Python error" not in out  # the worker's death is reported by the step, not dumped

    # the tiny models are cached in the user's cache dir; the demo's state is not the user's
    assert (metalguard_home / "cache" / "tiny-models" / "lm").is_dir()
    assert (metalguard_home / "cache" / "tiny-models" / "lm-reviewer").is_dir()
    assert not {"cadence.json", "breaker.json", "panics.jsonl"} & _state_files(metalguard_home)

    proc = demo("--json")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    assert data["ok"] is True and data["exit_code"] == 0
    assert [s["name"] for s in data["steps"]] == STEPS and all(s["ok"] for s in data["steps"])
    steps = {s["name"]: s for s in data["steps"]}
    assert steps["models"]["details"]["cached"] is True  # built once, reused
    assert "CrossModelCadenceViolation" in steps["load_reviewer"]["details"]["refused"]
    assert steps["load_reviewer"]["details"]["waited_sec"] > 0
    crash = steps["crash"]["details"]
    assert crash["crash"]["signal"] == "SIGABRT" and crash["respawns"] == 1
    assert crash["new_pid"] != crash["crash"]["pid"] and crash["text"]
    status = data["status"]
    assert status["breaker"]["recent_crash_count"] == 1
    assert status["resources"]["this_process"]["current_count"] == 2
    assert data["settings"]["cadence_min_interval_sec"] == 3.0
    assert not Path(data["home"]).exists() and data["home_kept"] is False


def test_demo_refuses_during_a_panic_cooldown(metalguard_home: Path, tmp_path: Path) -> None:
    reports = Path(os.environ["METALGUARD_DIAGNOSTIC_REPORTS_DIRS"])
    write_panic(reports, time.time() - 1800, written_after_sec=60)  # a GPU panic 30 min ago
    proc = demo("--json")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert "PanicCooldownActive" in data["error"]
    assert [s["name"] for s in data["steps"]][-1] == "load_drafter"
    assert data["steps"][-1]["ok"] is False


def test_demo_keep_home_and_usage_errors(tmp_path: Path) -> None:
    home = tmp_path / "demo-state"
    proc = demo("--home", str(home), "--max-tokens", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"state kept in {home}" in proc.stdout
    assert (home / "state" / "cadence.json").is_file()
    assert (home / "state" / "metal_breadcrumb.log").is_file()
    assert demo("--max-tokens", "0").returncode == 64


def test_run_demo_in_process_restores_the_environment(metalguard_home: Path) -> None:
    from metal_guard import installer as mg
    from metal_guard.demo import run_demo

    seen: list[tuple[str, bool]] = []
    result = run_demo(max_tokens=2, echo=lambda step, i, n: seen.append((step.name, step.ok)))
    assert result.ok, result.error
    assert seen == [(name, True) for name in STEPS]
    assert os.environ["METALGUARD_HOME"] == str(metalguard_home)
    assert not mg.is_installed()
    with pytest.raises(ValueError):
        run_demo(max_tokens=0)
