"""mlx-safe-python: the console script and the standalone bash twin, through real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from report_factory import write_panic

from metal_guard.cli.safe_python import is_allowlisted
from metal_guard.forensics.gate import mark_panic_sentinel_cooldown

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mlx-safe-python"
PY_ENTRY = [sys.executable, "-m", "metal_guard.cli.safe_python"]
BASH_ENTRY = ["bash", str(SCRIPT)]
ENTRIES = pytest.mark.parametrize("entry", [PY_ENTRY, BASH_ENTRY], ids=["console", "bash"])


@pytest.fixture
def rdir(rdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLX_SAFE_PYTHON_BIN", sys.executable)
    return rdir


def run(entry: list[str], *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*entry, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize(("argv", "allowed"), [
    (["-m", "pip", "install", "x"], True), (["-mpip", "list"], True), (["-m", "pip3.12"], True),
    (["-I", "-m", "venv", "/tmp/v"], True), (["-W", "ignore", "-m", "build"], True),
    (["--version"], True), (["-V"], True), (["-m", "ensurepip"], True),
    (["-c", "import mlx.core"], False), (["-cimport mlx"], False), (["script.py"], False),
    (["-m", "mlx_lm.generate"], False), (["-m", "pipx"], False), ([], False), (["-"], False),
    (["-m"], False),
])
def test_allowlist(argv: list[str], allowed: bool) -> None:
    assert is_allowlisted(argv) is allowed


@ENTRIES
def test_proceed_runs_the_command_with_its_exit_status(rdir: Path, entry: list[str]) -> None:
    proc = run(entry, "-c", "import sys; print('ran'); sys.exit(7)")
    assert (proc.returncode, proc.stdout.strip()) == (7, "ran"), proc.stderr


@ENTRIES
def test_cooldown_blocks_with_10(rdir: Path, tmp_path: Path, entry: list[str]) -> None:
    write_panic(rdir, time.time() - 600)
    marker = tmp_path / "ran"
    proc = run(entry, "-c", f"open({str(marker)!r}, 'w').close()")
    assert proc.returncode == 10 and not marker.exists()
    assert "BLOCKED" in proc.stderr and "MLX_SAFE_PYTHON_FORCE=1" in proc.stderr


@ENTRIES
def test_pip_passes_during_cooldown(rdir: Path, entry: list[str]) -> None:
    write_panic(rdir, time.time() - 600)
    proc = run(entry, "-m", "pip", "--version")
    assert proc.returncode == 0 and proc.stdout.startswith("pip ")


@ENTRIES
def test_force_overrides_with_a_warning(rdir: Path, entry: list[str]) -> None:
    write_panic(rdir, time.time() - 600)
    proc = run(entry, "-c", "print('forced')", env={"MLX_SAFE_PYTHON_FORCE": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == "forced"
    assert "WARNING" in proc.stderr and "MLX_SAFE_PYTHON_FORCE=1" in proc.stderr


@ENTRIES
def test_fail_open_emits_11_on_success_and_passes_failures(rdir: Path, tmp_path: Path, entry: list[str]) -> None:
    bogus = tmp_path / "not-a-dir"
    bogus.write_text("")
    env = {"METALGUARD_DIAGNOSTIC_REPORTS_DIRS": str(bogus)}
    proc = run(entry, "-c", "print('unguarded')", env=env)
    assert proc.returncode == 11 and proc.stdout.strip() == "unguarded"
    assert "fail-open" in proc.stderr
    assert run(entry, "-c", "raise SystemExit(5)", env=env).returncode == 5


@ENTRIES
def test_missing_interpreter_is_127(rdir: Path, tmp_path: Path, entry: list[str]) -> None:
    not_exec = tmp_path / "python-not-exec"
    not_exec.write_text("#!/bin/sh\n")
    assert run(entry, "-c", "1", env={"MLX_SAFE_PYTHON_BIN": str(not_exec)}).returncode == 127
    assert run(entry, "-c", "1", env={"MLX_SAFE_PYTHON_BIN": str(tmp_path / "nope")}).returncode == 127


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_fallback_blocks_on_sentinel_when_the_gate_cannot_run(rdir: Path) -> None:
    env = {"MLX_SAFE_PYTHON_GATE": "exit 1"}  # python gate unusable (wedged install)
    proc = run(BASH_ENTRY, "-c", "print('x')", env=env)
    assert proc.returncode == 11  # no evidence: fail-open
    mark_panic_sentinel_cooldown(1.0)
    proc = run(BASH_ENTRY, "-c", "print('x')", env=env)
    assert proc.returncode == 10 and "sentinel" in proc.stderr
    proc = run(BASH_ENTRY, "-c", "print('x')", env={**env, "MLX_SAFE_PYTHON_FORCE": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == "x"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_fallback_blocks_on_a_recent_iogpu_report(rdir: Path) -> None:
    write_panic(rdir, time.time() - 600)
    proc = run(BASH_ENTRY, "-c", "print('x')", env={"MLX_SAFE_PYTHON_GATE": "exit 127"})
    assert proc.returncode == 10 and "IOGPU kernel panic report" in proc.stderr


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(["-m", "-c", "-X", "-W", "-I", "pip", "--", "-"]),
                          st.text(max_size=10)), max_size=8))
def test_fuzz_allowlist_never_raises(argv: list[str]) -> None:
    result = is_allowlisted(argv)
    assert isinstance(result, bool)
    if result:  # anything let through must be pip/venv/build/ensurepip or an info flag
        assert any(a in ("-V", "--version", "-VV", "-h", "--help", "-?") or a.startswith("-m")
                   for a in argv)
