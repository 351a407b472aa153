"""status / heartbeat / status_prom (L13): schema, heartbeats, Prometheus, writer daemon."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest
from report_factory import write_metal_abort, write_panic

from metal_guard import status
from metal_guard.backend import MemoryCounters
from metal_guard.heartbeat import clear_published_memory, publish_memory, read_published_memory
from metal_guard.settings import get_settings
from metal_guard.status import (
    STATUS_SNAPSHOT_SCHEMA_VERSION,
    get_status_snapshot,
    prom_path_for,
    run_status_writer,
    snapshot_health,
    status_schema,
    write_status_snapshot,
)
from metal_guard.status_prom import render_prometheus

H = 3600.0


def validate(snap: dict) -> None:
    jsonschema.Draft202012Validator.check_schema(status_schema())
    jsonschema.validate(json.loads(json.dumps(snap)), status_schema())


def test_empty_snapshot_is_valid_and_healthy(rdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("metal_guard.backend.loaded_core", lambda: None)  # as in a fresh writer
    snap = get_status_snapshot()
    validate(snap)
    assert snap["schema_version"] == STATUS_SNAPSHOT_SCHEMA_VERSION
    assert snap["memory"] == {"available": False, "reason": "no guarded process has published memory",
                              "source": "heartbeats", "processes": []}
    assert snap["lock"] == {"held": False} and snap["panic_cooldown"]["exit_code"] == 0
    assert snapshot_health(snap) == (0, "OK")


def test_a_process_that_already_runs_mlx_reports_its_own_counters(rdir: Path) -> None:
    mx = pytest.importorskip("mlx.core")
    keep = mx.ones((256, 256))
    mx.eval(keep)
    snap = get_status_snapshot()
    validate(snap)
    own = [p for p in snap["memory"]["processes"] if p["label"] == "this process"]
    assert own and own[0]["memory"]["active_bytes"] >= 256 * 256 * 4
    assert snap["writer"]["mlx_imported"] is True


def test_snapshot_with_panics_heartbeats_and_breadcrumbs(rdir: Path) -> None:
    now = time.time()
    write_panic(rdir, now - 0.5 * H)
    write_metal_abort(rdir, now - H)
    from metal_guard.breadcrumbs import breadcrumb

    breadcrumb("LOAD: some/model START")
    publish_memory(MemoryCounters(active_bytes=3_000_000_000, peak_bytes=5_000_000_000,
                                  cache_bytes=1_000, limit_bytes=10_000_000_000, backend="metal"),
                   label="server", device={"architecture": "applegpu_g15s", "device_name": "Apple M3 Max"},
                   extra={"resources": {"current_count": 12, "threshold": 4000}}, force=True)
    snap = get_status_snapshot(now=now)
    validate(snap)
    mem = snap["memory"]
    assert mem["available"] and mem["active_bytes"] == 3_000_000_000 and mem["active_pct"] == 30.0
    assert mem["processes"][0]["label"] == "server"
    assert snap["gpu"]["family"] == "M3" and snap["gpu"]["source"].startswith("heartbeat")
    assert snap["resources"]["processes"][0]["current_count"] == 12
    assert len(snap["recent_panics"]) == 1 and len(snap["recent_aborts"]) == 1
    assert snap["breadcrumb_tail"][-1].endswith("LOAD: some/model START")
    assert snapshot_health(snap) == (2, "COOLDOWN")


def test_failing_collector_is_recorded_not_fatal(rdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ctx: dict) -> dict:
        raise OSError("lock sidecar unreadable")

    monkeypatch.setitem(status.COLLECTORS, "lock", broken)
    snap = get_status_snapshot()
    validate(snap)
    assert snap["lock"] is None and snap["errors"]["lock"] == "OSError: lock sidecar unreadable"
    assert snapshot_health(snap) == (1, "WARN")


def test_gate_broken_is_health_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bogus = tmp_path / "f"
    bogus.write_text("")
    monkeypatch.setenv("METALGUARD_DIAGNOSTIC_REPORTS_DIRS", str(bogus))
    snap = get_status_snapshot()
    validate(snap)
    assert snapshot_health(snap) == (3, "GATE BROKEN") and "reports" in snap["errors"]


def test_heartbeats_of_dead_or_reused_pids_are_dropped(rdir: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(proc.stdout)
    hb_dir = get_settings().cache_dir / "heartbeats"
    hb_dir.mkdir(parents=True)
    (hb_dir / f"{dead}.json").write_text(json.dumps({"pid": dead, "memory": {}, "published_at_ts": time.time()}))
    (hb_dir / f"{os.getpid()}.json").write_text(json.dumps(
        {"pid": os.getpid(), "create_time": 1.0, "memory": {}, "published_at_ts": time.time()}))
    assert read_published_memory(prune=True) == []
    assert not (hb_dir / f"{dead}.json").exists()  # pruned
    (hb_dir / "junk.json").write_text("not json")
    assert read_published_memory() == []


def test_publish_throttle_staleness_and_clear(rdir: Path) -> None:
    now = time.time()
    assert publish_memory({"active_bytes": 1}, now=now, force=True) is not None
    assert publish_memory({"active_bytes": 2}, now=now + 0.5) is None  # throttled
    assert publish_memory({"active_bytes": 3}, now=now + 2) is not None
    [hb] = read_published_memory(now=now + 2)
    assert hb["memory"]["active_bytes"] == 3 and hb["stale"] is False
    assert read_published_memory(now=now + 1000)[0]["stale"] is True
    assert get_status_snapshot(now=now + 1000)["memory"]["reason"] == "heartbeats are stale"
    assert clear_published_memory() is True and read_published_memory() == []
    with pytest.raises(TypeError):
        publish_memory(42)


def test_publish_accepts_memory_stats(rdir: Path) -> None:
    from metal_guard.memory import MemoryStats

    publish_memory(MemoryStats(active_bytes=7, limit_bytes=70, backend="cpu"), force=True)
    [hb] = read_published_memory()
    assert hb["memory"]["active_bytes"] == 7 and hb["memory"]["backend"] == "cpu"


_SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})? -?[0-9.e+]+$')


def test_prometheus_text_is_well_formed(rdir: Path) -> None:
    publish_memory({"active_bytes": 5, "limit_bytes": 10}, label='we"ird\\label\n', force=True)
    write_panic(rdir, time.time() - 0.5 * H)
    text = render_prometheus(get_status_snapshot())
    assert text.endswith("\n")
    names: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            assert name not in names
            names[name] = kind
        elif not line.startswith("#"):
            assert _SAMPLE.match(line), line
    assert 'metal_guard_panic_gate_state{state="cooldown"} 1' in text
    assert "metal_guard_gpu_kernel_panics_24h 1" in text
    assert 'label="we\\"ird\\\\label\\n"' in text


def test_write_snapshot_and_prom_file(rdir: Path, tmp_path: Path) -> None:
    path = write_status_snapshot()
    assert path == get_settings().resolved_status_path
    validate(json.loads(path.read_text()))
    assert prom_path_for(path).read_text().startswith("# HELP metal_guard_info")
    custom = write_status_snapshot(tmp_path / "s" / "x.json", prometheus=False)
    assert custom.exists() and not prom_path_for(custom).exists()


def test_writer_never_imports_mlx(rdir: Path) -> None:
    code = ("import sys; from metal_guard.status import write_status_snapshot; "
            "p = write_status_snapshot(); print('mlx' in sys.modules, 'mlx.core' in sys.modules, p)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    mlx, core, path = proc.stdout.strip().splitlines()[-1].split(" ", 2)
    assert (mlx, core) == ("False", "False"), proc.stderr
    assert json.loads(Path(path).read_text())["writer"]["mlx_imported"] is False


def test_daemon_loop_stops_on_event(rdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "d" / "status.json"
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(
        run_status_writer(out, interval=0.05, stop=stop, install_signal_handlers=False)))
    thread.start()
    deadline = time.time() + 30
    while not out.exists() and time.time() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join(timeout=30)
    assert result == [0] and out.exists()


def test_daemon_exits_cleanly_on_sigterm(rdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "status.json"
    proc = subprocess.Popen([sys.executable, "-m", "metal_guard", "status-write", "--interval", "3600",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not prom_path_for(out).exists() and time.time() < deadline:
        time.sleep(0.05)
    assert prom_path_for(out).exists(), proc.stderr.read() if proc.poll() is not None else ""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0  # it does not sit out its one-hour interval
    validate(json.loads(out.read_text()))


def test_once_failure_is_4(rdir: Path, tmp_path: Path) -> None:
    target = tmp_path / "is-a-dir"
    (target / "sub").mkdir(parents=True)
    assert run_status_writer(target, once=True) == 4
    with pytest.raises(ValueError):
        run_status_writer(tmp_path / "x.json", interval=0)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
_snap_keys = st.sampled_from(["mode", "gpu", "panic_cooldown", "memory", "lock", "breaker", "errors",
                              "recent_panics", "recent_aborts", "captured_at_ts", "schema_version"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_snap_keys, _json, max_size=8))
def test_fuzz_prometheus_and_health_never_raise(snap: dict) -> None:
    text = render_prometheus(snap)
    assert text.endswith("\n")
    code, _label = snapshot_health(snap)
    assert code in (0, 1, 2, 3)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_heartbeat_and_cache_files_never_raise(blob: bytes) -> None:
    from metal_guard.forensics.scancache import ScanCache

    home = get_settings().cache_dir
    (home / "heartbeats").mkdir(parents=True, exist_ok=True)
    (home / "heartbeats" / f"{os.getpid()}.json").write_bytes(blob)
    read_published_memory()
    (home / "scan.json").write_bytes(blob)
    cache = ScanCache.load(home / "scan.json")
    assert cache.get("/x", "fp") == (False, None)
