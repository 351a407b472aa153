"""Behaviour a metal-guard 0.11 user relies on, through the public names the seed README documents.

* the ``metal_guard_cli`` module (``python3 -m metal_guard_cli panic-gate`` is the seed's launchd
  fallback): same exit codes as ``metal-guard``, in the dev install and in a venv built from the wheel;
* ``format_panic_for_apple_feedback(forensics_dict)`` renders every key of the seed's mapping;
* ``KVGrowthTracker`` reports ``cumulative_gb`` and rejects negative byte counts;
* ``describe_process_mode()`` has ``argv0`` / ``has_ipykernel``; ``ResourceTracker.reset()``
  returns the prior count; advisories are readable as ``workaround`` / ``reason`` /
  ``first_observed``; ``CrossModelCadenceViolation`` is built without ``delta``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest
from report_factory import write_panic

import metal_guard as mg
from metal_guard import migrate

# --------------------------------------------------------------------------- metal_guard_cli

GATE_STATES = ("proceed", "cooldown", "broken")


def gate_env(home: Path, state: str) -> dict[str, str]:
    """A fresh home, reports dir and 0.11 directory in the given gate state."""
    for d in ("reports", "legacy"):
        (home / d).mkdir(parents=True, exist_ok=True)
    env = {"METALGUARD_HOME": str(home / "mg"),
           "METALGUARD_DIAGNOSTIC_REPORTS_DIRS": str(home / "reports"),
           "METALGUARD_LEGACY_DIR": str(home / "legacy")}
    if state == "cooldown":  # written by metal-guard 0.11 before the upgrade
        until = datetime.fromtimestamp(time.time() + 3600).isoformat(timespec="seconds")
        (home / "legacy" / "panic-sentinel.json").write_text(json.dumps({"cooldown_until": until}))
    elif state == "broken":
        env["METALGUARD_PANIC_LOCKOUT_72H_N"] = "three"
    return env


def run(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("METALGUARD_", "MLX_SAFE_PYTHON_"))}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**clean, **env}, cwd=cwd)


@pytest.mark.parametrize("state", GATE_STATES)
def test_module_cli_matches_the_console_script(tmp_path: Path, state: str) -> None:
    script = Path(sys.executable).parent / "metal-guard"
    module = run([sys.executable, "-m", "metal_guard_cli", "panic-gate"], gate_env(tmp_path / "m", state))
    console = run([str(script), "panic-gate"], gate_env(tmp_path / "c", state))
    expected = {"proceed": 0, "cooldown": 2, "broken": 3}[state]
    assert (module.returncode, console.returncode) == (expected, expected), module.stderr + console.stderr
    assert module.stdout == console.stdout


def test_shim_is_thin_and_keeps_the_0_11_names(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import json, sys
        import metal_guard_cli
        first = sorted(m for m in sys.modules if m.startswith("metal_guard"))
        rc = metal_guard_cli.main(["panic-gate", "--json"])
        heavy = sorted(m for m in ("mlx", "mlx.core", "mlx_lm", "wrapt", "numpy") if m in sys.modules)
        print(json.dumps({"first": first, "rc": rc, "heavy": heavy, "all": metal_guard_cli.__all__,
                          "safe": callable(metal_guard_cli.safe_python_main)}))
    """)
    proc = run([sys.executable, "-c", code], gate_env(tmp_path, "proceed"))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"first": ["metal_guard_cli"], "rc": 0, "heavy": [],
                   "all": ["main", "safe_python_main"], "safe": True}


def test_mlx_safe_python_blocks_on_a_0_11_cooldown(tmp_path: Path) -> None:
    env = gate_env(tmp_path, "cooldown")
    env["MLX_SAFE_PYTHON_BIN"] = sys.executable
    marker = tmp_path / "ran"
    blocked = run([str(Path(sys.executable).parent / "mlx-safe-python"), "-c",
                   f"open({str(marker)!r}, 'w').close()"], env)
    assert blocked.returncode == 10 and not marker.exists() and "BLOCKED" in blocked.stderr
    allowed = run([sys.executable, "-m", "metal_guard_cli", "panic-gate"], env)
    assert allowed.returncode == 2  # the same state, seen by the module CLI
    pip = run([str(Path(sys.executable).parent / "mlx-safe-python"), "-m", "pip", "--version"], env)
    assert pip.returncode == 0  # pip still passes during a cooldown, as documented


@pytest.mark.e2e
def test_built_wheel_ships_the_module_cli(tmp_path: Path, wheel_venv: object) -> None:
    venv = wheel_venv
    bin_dir = venv.root / "bin"  # type: ignore[attr-defined]
    python = str(venv.python)  # type: ignore[attr-defined]
    where = run([python, "-c", "import metal_guard_cli; print(metal_guard_cli.__file__)"],
                gate_env(tmp_path / "w", "proceed"), cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(venv.site))  # type: ignore[attr-defined]
    for state, expected in (("proceed", 0), ("cooldown", 2), ("broken", 3)):
        module = run([python, "-m", "metal_guard_cli", "panic-gate"], gate_env(tmp_path / f"m-{state}", state),
                     cwd=tmp_path)
        console = run([str(bin_dir / "metal-guard"), "panic-gate"], gate_env(tmp_path / f"c-{state}", state),
                      cwd=tmp_path)
        assert (module.returncode, console.returncode) == (expected, expected), \
            (state, module.stderr, console.stderr)


# --------------------------------------------------------------------------- R8 feedback


SEED_FORENSICS = {
    "panic_string": 'panic(cpu 3 caller 0xfffffe0027ffd0f8): "completeMemory() prepare count underflow" '
                    "@IOGPUMemory.cpp:492",
    "panic_time": "2026-04-16 23:33:27",
    "hardware": {"chip": "Apple M4 Max", "gpu_memory_gb": 128},
    "gpu_driver": "104.4.1",
    "os_version": "macOS 15.4 (24E248)",
    "kernel_version": "Darwin Kernel Version 24.4.0",
    "mlx_versions": {"mlx": "0.31.2", "mlx-lm": "0.31.3"},
    "repro_steps": ["load mlx-community/gemma-4-31b-it-8bit", "generate 8k tokens twice"],
    "breadcrumbs": ["[2026-04-16 23:33:20] SUBPROC_PRE: gemma", "[2026-04-16 23:33:25] GEMMA4_FLUSH"],
    "advisories": [{"severity": "high", "package": "mlx-lm", "installed_version": "0.31.2",
                    "title": "think_start_id crash", "url": "https://github.com/ml-explore/mlx-lm/issues/1128"}],
}


def test_feedback_renders_every_key_of_the_seed_mapping() -> None:
    md = mg.format_panic_for_apple_feedback(SEED_FORENSICS)
    for fragment in ("completeMemory() prepare count underflow", "2026-04-16 23:33:27",
                     "Apple M4 Max (128 GB unified)", "**IOGPUFamily:** 104.4.1",
                     "**macOS:** macOS 15.4 (24E248)", "**Kernel:** Darwin Kernel Version 24.4.0",
                     "**mlx:** 0.31.2", "**mlx-lm:** 0.31.3",
                     "1. load mlx-community/gemma-4-31b-it-8bit", "2. generate 8k tokens twice",
                     "SUBPROC_PRE: gemma", "GEMMA4_FLUSH",
                     "[high] mlx-lm 0.31.2: think_start_id crash (https://github.com/ml-explore/mlx-lm/issues/1128)",
                     "`iogpu_prepare_count_underflow`"):
        assert fragment in md, fragment
    assert "Report: ``" not in md  # no empty report path line for a mapping without one
    assert "GEMMA4_FLUSH" not in mg.format_panic_for_apple_feedback(SEED_FORENSICS, include_breadcrumb=False)
    trimmed = mg.format_panic_for_apple_feedback(SEED_FORENSICS, max_breadcrumb_lines=1)
    assert "GEMMA4_FLUSH" in trimmed and "SUBPROC_PRE: gemma" not in trimmed


def test_feedback_keywords_win_over_the_mapping_and_missing_keys_are_tolerated() -> None:
    md = mg.format_panic_for_apple_feedback(SEED_FORENSICS, reproducer=["my own step"], advisories=[])
    assert "1. my own step" in md and "think_start_id" not in md
    bare = mg.format_panic_for_apple_feedback({"panic_string": "panic(cpu 0): something"})
    assert "unknown time" in bare and "## Steps to reproduce" in bare


# --------------------------------------------------------------------------- R5 / R6 / L14


def test_kv_tracker_keeps_cumulative_gb_and_rejects_shrinking() -> None:
    tracker = mg.KVGrowthTracker()
    tracker.start("req-1", ceiling_gb=1.0)
    assert tracker.add_bytes("req-1", 300_000_000) == 300_000_000
    assert tracker.add_bytes("req-1", 200_000_000) == 500_000_000
    [snap] = [s for s in tracker.snapshot() if s["request_id"] == "req-1"]
    assert (snap["cumulative_gb"], snap["step_count"]) == (0.5, 2)
    for bad in (-1, -0.5, float("nan"), float("inf"), "12", None, True):
        with pytest.raises(ValueError):
            tracker.add_bytes("req-1", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tracker.add_bytes("never-started", -1)  # validated before the lookup, as in 0.11
    final = tracker.finalize("req-1")
    assert final is not None and final["cumulative_gb"] == 0.5 and final["step_count"] == 2
    with pytest.raises(mg.MetalOOMError):
        tracker.start("req-2", ceiling_gb=0.1)
        tracker.add_bytes("req-2", 200_000_000)


def test_describe_process_mode_has_the_seed_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    info = mg.describe_process_mode()
    assert info["argv0"] == os.path.basename(sys.argv[0])
    assert info["has_ipykernel"] is False and info["subprocess_worker_env"] == ""
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    monkeypatch.setenv("METALGUARD_SUBPROCESS_WORKER", "1")
    info = mg.describe_process_mode()
    assert info["has_ipykernel"] is True and info["subprocess_worker_env"] == "1"
    assert info["mode"] == "subprocess_worker"


def test_resource_tracker_reset_returns_the_prior_count() -> None:
    tracker = mg.ResourceTracker(cold_restart_after=5)
    for _ in range(3):
        tracker.record_inference()
    assert tracker.reset() == 3
    assert tracker.snapshot()["current_count"] == 0
    assert tracker.snapshot()["last_restart_at_count"] == 3
    assert tracker.reset() == 0


# --------------------------------------------------------------------------- advisories, errors


def test_workload_advisories_read_under_both_spellings() -> None:
    entry = mg.WORKLOAD_ADVISORIES["lora_with_display_active"]
    assert entry["workaround"] == entry["mitigation"] and "display" in entry["workaround"]
    assert entry["reason"] == entry["symptom"]
    assert "first_observed" in entry
    checked = mg.check_workload_advisory("lora_with_display_active")
    assert checked is not None and checked["workaround"] == entry["mitigation"]
    blocked = mg.check_mlx_version_blocked("0.31.2")
    assert blocked is not None and blocked["mitigation"] == blocked["workaround"]
    assert blocked["first_observed"] == "2026-04"


def test_cross_model_violation_without_delta() -> None:
    last = time.time() - 20
    exc = mg.CrossModelCadenceViolation(model_id="mlx-community/gemma-4-26b-a4b-it-4bit",
                                        last_model="mlx-community/Phi-4-mini", last_ts=last,
                                        cross_model_interval=90.0)
    assert isinstance(exc, mg.CadenceViolation)
    assert exc.delta == pytest.approx(20, abs=2) and exc.remaining_sec == pytest.approx(70, abs=2)
    assert exc.last_model == "mlx-community/Phi-4-mini" and exc.cross_model_interval == 90.0
    positional = mg.CrossModelCadenceViolation("a", "b", last, 60.0)
    assert positional.model_id == "a" and positional.delta == pytest.approx(20, abs=2)
    explicit = mg.CrossModelCadenceViolation("a", last_model="b", last_ts=last,
                                             cross_model_interval=60.0, delta=5.0)
    assert explicit.delta == 5.0 and "55.0s" in str(explicit)


def test_migrating_doc_lists_every_difference_and_is_linked() -> None:
    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "migrating.md").read_text()
    assert "migrating.md" in (root / "README.md").read_text()
    for topic in ("metal_guard_cli", "METALGUARD_LEGACY_DIR", "severity", "PanicRecord",
                  "MemoryStats", "can_fit", "schema", "kv_monitor", "SettingsError",
                  "run_postmortem", "SUBPROCESS_WORKER", "cumulative_gb", "workaround",
                  "CrossModelCadenceViolation", "format_panic_for_apple_feedback", "reset()",
                  "argv0", migrate.MARKER_FILE):
        assert topic in doc, topic


def test_gate_reads_a_0_11_sentinel_written_in_this_process(tmp_path: Path, rdir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process public API, as a launchd wrapper written against 0.11 would call it."""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    monkeypatch.setenv("METALGUARD_LEGACY_DIR", str(legacy))
    write_panic(rdir, time.time() - 30 * 3600)  # old, not gating
    until = datetime.fromtimestamp(time.time() + 600).isoformat(timespec="seconds")
    (legacy / "panic-sentinel.json").write_text(json.dumps({"cooldown_until": until}))
    verdict = mg.evaluate_panic_cooldown()
    assert verdict.exit_code == 2 and "0.11" in verdict.reason
