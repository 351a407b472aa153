"""Every file in examples/ runs, exactly as written, the way a user would run it.

Each test gets a fresh ``METALGUARD_HOME`` (conftest), so the examples build the demo's tiny
model in it on first use — offline, as on a fresh machine.
"""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlx_lm")

from report_factory import write_panic
from support import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.e2e


def run(*cmd: str | Path, timeout: float = 180.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env if env is not None else dict(os.environ))


def test_every_example_has_a_test() -> None:
    names = {p.name for p in EXAMPLES.iterdir() if p.is_file()} - {"README.md"}
    assert names == {"quickstart.py", "agent_loop.py", "pipeline_multi_model.py",
                     "langchain_chat.py", "server_zero_code.sh"}
    assert {p.name for p in (EXAMPLES / "launchd").glob("*.plist")} == {
        "com.metal-guard.status-writer.plist", "com.example.mlx-server.plist",
        "com.example.mlx-serve.plist"}  # the serve example: tests/test_serve_examples.py


def test_quickstart(tiny_model_path: Path) -> None:
    first = run(sys.executable, EXAMPLES / "quickstart.py")
    assert first.returncode == 0, first.stderr
    assert "guarded by metal-guard: mlx_lm" in first.stdout
    # another model right away is fine (no cross-model interval by default) ...
    other = run(sys.executable, EXAMPLES / "quickstart.py", tiny_model_path)
    assert other.returncode == 0, other.stderr
    # ... and so is re-running it at once: a tiny model never waits (risk-scaled cadence) ...
    rerun = run(sys.executable, EXAMPLES / "quickstart.py")
    assert rerun.returncode == 0, rerun.stderr
    # ... while with a fixed interval the same model again is refused, clearly, with EX_TEMPFAIL
    fixed = {**os.environ, "METALGUARD_CADENCE_MIN_INTERVAL_SEC": "180"}
    again = run(sys.executable, EXAMPLES / "quickstart.py", env=fixed)
    assert again.returncode == 75
    assert "metal-guard refused the load: cadence:" in again.stderr
    assert "metal-guard cadence reset" in again.stderr


def test_agent_loop() -> None:
    proc = run(sys.executable, EXAMPLES / "agent_loop.py", "--steps", "30")
    assert proc.returncode == 0, proc.stderr
    assert "30 guarded generations" in proc.stdout


def test_pipeline_multi_model() -> None:
    proc = run(sys.executable, EXAMPLES / "pipeline_multi_model.py")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("draft:") and lines[1].startswith("review:") and "worker pid" in lines[1]
    assert lines[2].startswith("revision:")
    assert any("SUBPROCESS_WORKER" in line for line in lines)


def test_langchain_chat() -> None:
    pytest.importorskip("langchain_community")
    proc = run(sys.executable, EXAMPLES / "langchain_chat.py")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "probe failed" not in proc.stderr
    stats = json.loads(proc.stdout.splitlines()[-1].split(":", 1)[1])
    assert stats["calls"] == 2 and stats["completed"] == 2 and stats["streamed_tokens"] > 0


def test_server_zero_code() -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    env = dict(os.environ, PORT=str(free_port()), PYTHON=sys.executable,
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = run("bash", EXAMPLES / "server_zero_code.sh", env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert '"mlx_lm_server": "patched"' in proc.stdout
    assert "metal_guard_server_requests_total 1" in proc.stdout
    assert '"chat.completion"' in proc.stdout


# --------------------------------------------------------------------------- launchd

LAUNCHD = EXAMPLES / "launchd"
PLACEHOLDER_PY = "/opt/homebrew/bin/python3"
PLACEHOLDER_SERVER = "/opt/homebrew/bin/mlx_lm.server"
GENERATE = {
    "com.metal-guard.status-writer.plist": [
        "status-writer", "--python", PLACEHOLDER_PY, "--log-dir", "/Users/you/Library/Logs/metal-guard"],
    "com.example.mlx-server.plist": [
        "gate-job", "--label", "com.example.mlx-server", "--python", PLACEHOLDER_PY,
        "--log-dir", "/Users/you/Library/Logs/metal-guard", "--",
        PLACEHOLDER_PY, "-m", "metal_guard", "run", "--", PLACEHOLDER_SERVER,
        "--model", "mlx-community/Qwen3-4B-4bit", "--host", "127.0.0.1", "--port", "8080"],
}


@pytest.mark.parametrize("name", sorted(GENERATE))
def test_launchd_plists_match_the_generator(name: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "METALGUARD_HOME"}
    proc = run(sys.executable, "-m", "metal_guard", "launchd-plist", *GENERATE[name], env=env)
    assert proc.returncode == 0, proc.stderr
    assert plistlib.loads(proc.stdout.encode()) == plistlib.loads((LAUNCHD / name).read_bytes())
    # the README shows the same command lines
    readme = (LAUNCHD / "README.md").read_text()
    assert "--label com.example.mlx-server" in readme and PLACEHOLDER_SERVER in readme


def _program(name: str, **subst: str) -> list[str]:
    args = plistlib.loads((LAUNCHD / name).read_bytes())["ProgramArguments"]
    return [subst.get(a, a) for a in args]


def test_launchd_status_writer_runs(metalguard_home: Path) -> None:
    cmd = _program("com.metal-guard.status-writer.plist", **{PLACEHOLDER_PY: sys.executable})
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    status = metalguard_home / "cache" / "status.json"
    try:
        deadline = time.monotonic() + 60
        while not status.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert status.exists(), proc.stderr.read() if proc.poll() is not None else "no status.json"
        assert status.with_suffix(".prom").exists()
        assert proc.poll() is None  # a KeepAlive daemon keeps running
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _server_program(tiny_model_path: Path, port: int) -> list[str]:
    cmd = _program("com.example.mlx-server.plist", **{
        PLACEHOLDER_PY: sys.executable, PLACEHOLDER_SERVER: str(BIN / "mlx_lm.server"),
        "mlx-community/Qwen3-4B-4bit": str(tiny_model_path), "8080": str(port)})
    assert cmd[0] == "/bin/sh"
    return cmd


def test_launchd_gate_job_starts_a_guarded_server(tiny_model_path: Path, tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(_server_program(tiny_model_path, port), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        snap = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metal-guard/status", timeout=5) as r:
                    snap = json.loads(r.read())
                    break
            except OSError:
                time.sleep(0.3)
        assert snap is not None, (tmp_path / "server.log").read_text()[-3000:]
        assert snap["adapters"]["mlx_lm_server"] == "patched"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def test_launchd_gate_job_refuses_during_a_panic_cooldown(tiny_model_path: Path) -> None:
    reports = Path(os.environ["METALGUARD_DIAGNOSTIC_REPORTS_DIRS"])
    write_panic(reports, time.time() - 1800, written_after_sec=60)
    proc = run(*_server_program(tiny_model_path, free_port()), timeout=60)
    assert proc.returncode == 2  # launchd retries after ThrottleInterval; the server never started
    assert "mlx_lm.server" not in proc.stdout
