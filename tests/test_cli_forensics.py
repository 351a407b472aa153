"""CLI forensics/status subcommands through real subprocesses: every exit code, --json everywhere."""

from __future__ import annotations

import json
import os
import plistlib
import subprocess
import sys
import time
from pathlib import Path

from report_factory import write_panic

from metal_guard.breadcrumbs import format_line
from metal_guard.cli import EXIT_CODES
from metal_guard.forensics import gate
from metal_guard.settings import get_settings

H = 3600.0


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "metal_guard", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def run_json(*args: str, **kw: object) -> tuple[int, dict]:
    proc = run(*args, "--json", **kw)  # type: ignore[arg-type]
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_gate_exit_codes_match_the_table() -> None:
    assert gate.EXIT_PROCEED == 0 and gate.EXIT_PANIC_COOLDOWN == 2 and gate.EXIT_GATE_BROKEN == 3
    assert {0, 1, 2, 3, 4, 10, 11, 64} <= set(EXIT_CODES)


def test_panic_gate_0_2_3_and_usage_64(rdir: Path, tmp_path: Path) -> None:
    proc = run("panic-gate")
    assert proc.returncode == 0 and proc.stdout.startswith("PROCEED")
    write_panic(rdir, time.time() - 600)
    proc = run("panic-gate", "-v")
    assert proc.returncode == 2 and proc.stderr.startswith("COOLDOWN") and "IOGPUMemory" not in proc.stdout
    code, data = run_json("panic-gate")
    assert code == 2 and data["state"] == "cooldown" and data["recent_panics_24h"] == 1
    bogus = tmp_path / "file"
    bogus.write_text("")
    proc = run("panic-gate", env={"METALGUARD_DIAGNOSTIC_REPORTS_DIRS": str(bogus)})
    assert proc.returncode == 3 and "GATE BROKEN" in proc.stderr
    assert run("panic-gate", env={"METALGUARD_PANIC_LOCKOUT_72H_N": "x"}).returncode == 3
    assert run("panic-gate", "--bogus").returncode == 64
    assert run("panic-gate", env={"METALGUARD_PANIC_GATE_DISABLED": "1"}).returncode == 0


def test_ack_clears_lockout(rdir: Path) -> None:
    now = time.time()
    write_panic(rdir, now - 5 * H)
    write_panic(rdir, now - 3 * H)
    code, data = run_json("panic-gate")
    assert (code, data["state"]) == (2, "lockout")
    code, data = run_json("ack", "--note", "changed the model")
    assert code == 0 and data["verdict"]["state"] == "acked"
    assert run("panic-gate").returncode == 0
    code, data = run_json("ack", "--clear")
    assert code == 0 and data["ack_removed"] is True
    assert run("panic-gate").returncode == 2


def test_ack_clear_sentinel(rdir: Path) -> None:
    gate.mark_panic_sentinel_cooldown(2.0)
    proc = run("ack")
    assert proc.returncode == 0 and "--clear-sentinel" in proc.stdout
    assert run("panic-gate").returncode == 2
    assert run("ack", "--clear-sentinel").returncode == 0
    assert run("panic-gate").returncode == 0


def test_panics_0_and_1(rdir: Path) -> None:
    code, data = run_json("panics")
    assert code == 0 and data["gpu_panic_count"] == 0
    write_panic(rdir, time.time() - 30 * H)
    code, data = run_json("panics", "--since-hours", "48")
    assert code == 1 and data["gpu_panic_count"] == 1
    assert run("panics", "--since-hours", "1").returncode == 0
    assert run("panics", "--since-hours", "-1").returncode == 64


def test_status_health_codes(rdir: Path, tmp_path: Path) -> None:
    proc = run()  # the default command is status
    assert proc.returncode == 0 and "[OK]" in proc.stdout
    write_panic(rdir, time.time() - 30 * H)  # in 72 h, no cooldown: warn
    code, snap = run_json("status")
    assert code == 1 and snap["health"] == {"exit_code": 1, "label": "WARN"}
    write_panic(rdir, time.time() - 600)
    assert run("status").returncode == 2
    bogus = tmp_path / "file"
    bogus.write_text("")
    assert run("status", env={"METALGUARD_DIAGNOSTIC_REPORTS_DIRS": str(bogus)}).returncode == 3
    prom = run("status", "--format", "prometheus")
    assert prom.stdout.startswith("# HELP metal_guard_info") and prom.returncode == 2


def test_status_write_once_and_failure(rdir: Path, tmp_path: Path) -> None:
    proc = run("status-write", "--once")
    assert proc.returncode == 0
    path = get_settings().resolved_status_path
    assert Path(proc.stdout.strip()) == path and path.with_suffix(".prom").exists()
    blocked = tmp_path / "dir"
    (blocked / "x").mkdir(parents=True)
    assert run("status-write", "--once", "--out", str(blocked)).returncode == 4
    assert run("status-write", "--once", "--interval", "3").returncode == 64
    assert run("status-write", "--interval", "0").returncode == 64


def test_breadcrumb_and_mode() -> None:
    path = get_settings().resolved_breadcrumb_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([format_line("LOAD", "a"), format_line("GEN", "b"), format_line("LOAD", "c")]) + "\n")
    code, data = run_json("breadcrumb", "-n", "5", "--tag", "load")
    assert code == 0 and [line.rsplit(" ", 1)[-1] for line in data["lines"]] == ["a", "c"]
    assert run("breadcrumb", "-n", "-2").returncode == 64
    code, data = run_json("mode", env={"METALGUARD_MODE": "observer"})
    assert code == 0 and data["current"] == "observer"


def test_postmortem_codes(rdir: Path, tmp_path: Path) -> None:
    code, data = run_json("postmortem", str(tmp_path / "quiet"))
    assert code == 0 and data["panic_count"] == 0
    write_panic(rdir, time.time() - H)
    code, data = run_json("postmortem", str(tmp_path / "found"))
    assert code == 1 and data["panic_count"] == 1 and data["sentinel"]
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    assert run("postmortem", str(a_file)).returncode == 4
    assert run("postmortem").returncode == 64


def test_orphan_scan_codes(rdir: Path) -> None:
    assert run("orphan-scan").returncode == 0
    path = get_settings().resolved_breadcrumb_path
    path.parent.mkdir(parents=True, exist_ok=True)
    from datetime import UTC, datetime

    old = datetime.fromtimestamp(time.time() - 500, UTC)
    path.write_text(format_line("SUBPROC_PRE", "mlx-community/x", now=old) + "\n")
    code, data = run_json("orphan-scan")
    assert code == 1 and data["orphans"][0]["model_id"] == "mlx-community/x"
    assert run("orphan-scan", "--threshold-sec", "1000").returncode == 0
    assert run("orphan-scan", "--threshold-sec", "-5").returncode == 64
    assert run("orphan-scan", env={"METALGUARD_SUBPROC_ORPHAN_WATCH_DISABLED": "1"}).returncode == 0


def test_orphan_scan_kill_end_to_end(rdir: Path) -> None:
    import psutil

    # --kill signals only what is verifiably a metal-guard worker of the model: this sleeper
    # carries a worker's command line
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "-m",
                               "metal_guard.isolation.worker", "--config", '{"model_id": "m"}'])
    try:
        ct = psutil.Process(worker.pid).create_time()
        path = get_settings().resolved_breadcrumb_path
        path.parent.mkdir(parents=True, exist_ok=True)
        from datetime import UTC, datetime

        old = datetime.fromtimestamp(time.time() - 500, UTC)
        path.write_text(format_line("SUBPROCESS_WORKER", "m ready", now=old, pid=worker.pid, create_time=ct)
                        + "\n" + format_line("SUBPROC_PRE", "m", now=old, pid=worker.pid) + "\n")
        code, data = run_json("orphan-scan", "--kill", "--grace-sec", "5")
        assert code == 1 and data["kill"][0]["action"] == "terminated"
        assert worker.wait(timeout=10) == -15
    finally:
        if worker.poll() is None:
            worker.kill()


def test_launchd_plists() -> None:
    proc = run("launchd-plist", "status-writer", "--interval", "15")
    assert proc.returncode == 0
    plist = plistlib.loads(proc.stdout.encode())
    assert plist["ProgramArguments"][1:] == ["-m", "metal_guard", "status-write", "--interval", "15"]
    assert os.path.isabs(plist["ProgramArguments"][0]) and plist["KeepAlive"] is True
    proc = run("launchd-plist", "gate-job", "--label", "com.example.mlx", "--", "/opt/bin/serve", "--port", "8080")
    assert proc.returncode == 0
    job = plistlib.loads(proc.stdout.encode())
    assert job["ProgramArguments"][-3:] == ["/opt/bin/serve", "--port", "8080"]
    assert job["KeepAlive"] == {"SuccessfulExit": False} and job["ThrottleInterval"] == 300
    assert run("launchd-plist", "gate-job", "--", "x").returncode == 64  # no --label
    assert run("launchd-plist", "nope").returncode == 64
    code, data = run_json("launchd-plist", "status-writer")
    assert code == 0 and data["plist"]["Label"] == "com.metal-guard.status-writer"


def test_gate_job_script_really_gates(rdir: Path, tmp_path: Path) -> None:
    """Run the plist's ProgramArguments as launchd would."""
    marker = tmp_path / "ran"
    proc = run("launchd-plist", "gate-job", "--label", "t", "--", sys.executable, "-c",
               f"open({str(marker)!r}, 'w').close()")
    argv = plistlib.loads(proc.stdout.encode())["ProgramArguments"]
    assert subprocess.run(argv, capture_output=True, timeout=60).returncode == 0 and marker.exists()
    marker.unlink()
    write_panic(rdir, time.time() - 600)
    blocked = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert blocked.returncode == 2 and not marker.exists() and "COOLDOWN" in blocked.stderr


def test_ack_write_failure_is_4(tmp_path: Path) -> None:
    blocker = tmp_path / "home-is-a-file"
    blocker.write_text("")
    proc = run("ack", env={"METALGUARD_HOME": str(blocker)})
    assert proc.returncode == 4 and "cannot write state" in proc.stderr
