"""migrate.py: a metal-guard 0.11 installation's state on disk keeps blocking after the upgrade.

The 0.11 files are written here exactly as the reference wrote them (``panic-sentinel.json``
with a naive *local* ISO ``cooldown_until``, ``breaker.json`` / ``cadence.json`` with epochs,
``panics.jsonl`` lines, the ``~/.metal-guard-ack`` touch file) into ``METALGUARD_LEGACY_DIR``,
and the effect is checked through the public surfaces: the gate (in-process and the CLI exit
code), the circuit breaker, the cadence guard, a guarded ``mlx_lm.load`` and the status snapshot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from report_factory import write_panic

from metal_guard import migrate
from metal_guard.breadcrumbs import tail
from metal_guard.breaker import CircuitBreaker, read_panic_archive
from metal_guard.cadence import CadenceGuard, require_cadence_clear
from metal_guard.errors import CadenceViolation, MLXCooldownActive
from metal_guard.forensics.gate import clear_panic_sentinel, evaluate_panic_cooldown
from metal_guard.settings import get_settings
from metal_guard.status import get_status_snapshot


@pytest.fixture
def legacy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An (empty) 0.11 state directory that metal-guard reads as ``~/.cache/metal-guard``."""
    d = tmp_path / "dot-cache-metal-guard"
    d.mkdir()
    monkeypatch.setenv("METALGUARD_LEGACY_DIR", str(d))
    return d


def local_iso(ts: float) -> str:
    """What 0.11 wrote: ``datetime.now().isoformat(timespec="seconds")`` — naive local time."""
    return datetime.fromtimestamp(ts).isoformat(timespec="seconds")


def write_sentinel(legacy: Path, until: float) -> Path:
    path = legacy / "panic-sentinel.json"
    path.write_text(json.dumps({"cooldown_until": local_iso(until), "created_at": local_iso(time.time())}))
    return path


def write_breaker(legacy: Path, until: float, count: int = 2) -> None:
    now = time.time()
    (legacy / "breaker.json").write_text(json.dumps(
        {"cooldown_until": until, "panic_count": count, "entered_at": now - 60,
         "window_sec": 3600.0, "threshold": 2}, sort_keys=True))


def write_panics(legacy: Path, records: list[dict[str, Any]]) -> None:
    with open(legacy / "panics.jsonl", "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")


def panic_line(ts: float, pid: int = 4242, name: str | None = None) -> dict[str, Any]:
    return {"ts": ts, "signature": "prepare_count_underflow", "explanation": "IOGPUMemory.cpp:492",
            "pid": pid, "source_file": f"/Library/Logs/DiagnosticReports/{name or f'p-{int(ts)}.panic'}"}


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())
            if p.is_file() and not p.is_symlink()}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "metal_guard", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def marker() -> Path:
    return get_settings().state_file(migrate.MARKER_FILE)


# --------------------------------------------------------------------------- the sentinel


def test_reference_sentinel_blocks_the_gate_and_the_cli(legacy: Path) -> None:
    until = time.time() + 1800
    write_sentinel(legacy, until)
    before = snapshot(legacy)
    proc = cli("panic-gate")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "metal-guard 0.11" in proc.stdout + proc.stderr
    verdict = evaluate_panic_cooldown()
    assert verdict.exit_code == 2 and verdict.state == "cooldown"
    assert verdict.cooldown_until == pytest.approx(int(until), abs=1.5)  # seconds precision in 0.11
    summary = json.loads(marker().read_text())
    assert summary["sentinel"]["taken"] is True
    assert next(b for b in tail(50) if b.tag == "LEGACY_IMPORT").meta["sentinel_until"]
    assert snapshot(legacy) == before  # read only: nothing written, moved or touched


def test_naive_cooldown_until_is_read_as_local_time(legacy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "MGT-9")  # UTC+9, POSIX form: no tz database needed
    time.tzset()
    try:
        until = time.time() + 3 * 3600
        (legacy / "panic-sentinel.json").write_text(json.dumps(
            {"cooldown_until": datetime.fromtimestamp(until).isoformat(timespec="seconds")}))
        verdict = evaluate_panic_cooldown()
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    # read as UTC it would be 9 h later; read as "now" it would be 3 h earlier
    assert verdict.exit_code == 2
    assert verdict.cooldown_until == pytest.approx(int(until), abs=1.5)


def test_expired_sentinel_is_not_carried_over(legacy: Path) -> None:
    write_sentinel(legacy, time.time() - 60)
    assert evaluate_panic_cooldown().exit_code == 0
    summary = json.loads(marker().read_text())
    assert summary["sentinel"] == {"cooldown_until": summary["sentinel"]["cooldown_until"],
                                   "taken": False, "why": "expired"}


def test_a_far_future_sentinel_is_capped_not_dropped(legacy: Path) -> None:
    (legacy / "panic-sentinel.json").write_text(json.dumps({"cooldown_until": "9999-12-31T23:59:59"}))
    now = time.time()
    verdict = evaluate_panic_cooldown()
    assert verdict.exit_code == 2
    assert verdict.cooldown_until == pytest.approx(now + migrate.MAX_COOLDOWN_SEC, abs=60)
    assert json.loads(marker().read_text())["sentinel"]["capped_from"].startswith("9999-12-31")


def test_the_import_happens_once_and_then_costs_one_stat(legacy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_sentinel(legacy, time.time() + 1800)
    assert migrate.ensure_imported() is not None
    assert migrate.ensure_imported() is None  # already done
    # the operator clears our sentinel: the 0.11 file (still there) is not imported again
    assert clear_panic_sentinel()
    assert evaluate_panic_cooldown().exit_code == 0

    def must_not_run(*_a: Any, **_k: Any) -> None:
        raise AssertionError("import ran although the marker exists")

    monkeypatch.setattr(migrate, "import_legacy_state", must_not_run)
    assert migrate.ensure_imported() is None
    assert len([b for b in tail(50) if b.tag == "LEGACY_IMPORT"]) == 1


def test_nothing_is_written_when_there_is_no_0_11_state(legacy: Path) -> None:
    legacy.rmdir()
    assert migrate.ensure_imported() is None
    assert evaluate_panic_cooldown().exit_code == 0
    assert not marker().exists()


def test_racing_first_uses_import_exactly_once(legacy: Path, tmp_path: Path) -> None:
    write_sentinel(legacy, time.time() + 1800)
    write_breaker(legacy, time.time() + 900)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            codes = list(pool.map(lambda _: cli("panic-gate").returncode, range(4)))
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert codes == [2, 2, 2, 2]
    assert len([b for b in tail(200) if b.tag == "LEGACY_IMPORT"]) == 1


# --------------------------------------------------------------------------- breaker, cadence, panics


def test_open_reference_breaker_stays_open(legacy: Path) -> None:
    until = time.time() + 1200
    write_breaker(legacy, until)
    with pytest.raises(MLXCooldownActive) as info:
        CircuitBreaker().check()
    assert info.value.cooldown_until == pytest.approx(until)
    assert CircuitBreaker().status()["in_cooldown"] is True
    proc = cli("breaker", "status", "--json")
    assert json.loads(proc.stdout)["in_cooldown"] is True


def test_expired_or_closed_reference_breaker_is_ignored(legacy: Path) -> None:
    write_breaker(legacy, time.time() - 10)
    assert CircuitBreaker().check()["in_cooldown"] is False


def test_recent_reference_load_still_counts_for_cadence(legacy: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # The interval is ours (risk-scaled, or the setting); the 0.11 load is the fact carried over.
    monkeypatch.setenv("METALGUARD_CADENCE_MIN_INTERVAL_SEC", "180")
    now = time.time()
    (legacy / "cadence.json").write_text(json.dumps({
        "mlx-community/Phi-4-mini-instruct-4bit": now - 30,
        "mlx-community/ancient": now - 5 * 3600,       # past the 0.11 GC horizon
        "bad\nname": now - 10,                          # a separator smuggled into a key
        "from-the-future": now + 7200,                  # not a real load
        "not-a-number": "yesterday",
    }))
    with pytest.raises(CadenceViolation) as info:
        require_cadence_clear("mlx-community/Phi-4-mini-instruct-4bit")
    assert info.value.delta == pytest.approx(30, abs=5)
    assert set(CadenceGuard().entries()) == {"mlx-community/Phi-4-mini-instruct-4bit"}
    cadence = json.loads(marker().read_text())["cadence"]
    assert cadence["taken"] == 1 and cadence["invalid_entries"] == 2


def test_recent_reference_panics_trip_the_breaker(legacy: Path) -> None:
    now = time.time()
    write_panics(legacy, [panic_line(now - 1500, pid=1), panic_line(now - 600, pid=2),
                          panic_line(now - 30 * 86400, pid=3)])  # history older than 7 days: dropped
    with pytest.raises(MLXCooldownActive):
        CircuitBreaker().check()
    archived = [r for r in read_panic_archive() if r.timestamp_source == "metal-guard 0.11 archive"]
    assert sorted(r.pid for r in archived) == [1, 2] and all(r.is_gpu for r in archived)


def test_a_panic_both_versions_saw_counts_once(legacy: Path, rdir: Path) -> None:
    """The report is still in DiagnosticReports and in the 0.11 archive: one panic, not two."""
    when = time.time() - 3000
    report = write_panic(rdir, when)
    write_panics(legacy, [panic_line(when + 40, pid=50218, name=report.name)])
    status = CircuitBreaker().check()  # threshold 2: one panic must not trip it
    assert status["in_cooldown"] is False and status["recent_panic_count"] == 1
    assert json.loads(marker().read_text())["panics"] == {"taken": 0, "already_known": 1}


@pytest.mark.parametrize("state", ["sentinel", "breaker", "cadence"])
def test_guarded_load_is_refused_by_reference_state(legacy: Path, tiny_model_path: Path, state: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    mlx_lm = pytest.importorskip("mlx_lm")
    # Tiny models never wait under the risk-scaled rule; the fixed 0.11 interval is the setting.
    monkeypatch.setenv("METALGUARD_CADENCE_MIN_INTERVAL_SEC", "180")
    from metal_guard import installer
    from metal_guard.errors import PanicCooldownActive

    now = time.time()
    if state == "sentinel":
        write_sentinel(legacy, now + 1800)
    elif state == "breaker":
        write_breaker(legacy, now + 600)
    else:
        (legacy / "cadence.json").write_text(json.dumps({str(tiny_model_path): now - 20}))
    expected = {"sentinel": PanicCooldownActive, "breaker": MLXCooldownActive,
                "cadence": CadenceViolation}[state]
    installer.install(adapters=["mlx_lm"], cadence=True)
    try:
        with pytest.raises(expected) as info:
            mlx_lm.load(str(tiny_model_path))
        if state == "breaker":  # the exact class, not merely another LoadRefused
            assert type(info.value) is MLXCooldownActive
    finally:
        installer.uninstall()


def test_status_snapshot_shows_what_was_carried_over(legacy: Path) -> None:
    write_sentinel(legacy, time.time() + 1800)
    write_breaker(legacy, time.time() + 900)
    snap = get_status_snapshot(include_panics=False)
    assert snap["panic_cooldown"]["exit_code"] == 2
    assert snap["breaker"]["in_cooldown"] is True


# --------------------------------------------------------------------------- the ack


@pytest.fixture
def lockout(rdir: Path) -> Iterator[float]:
    now = time.time()
    write_panic(rdir, now - 4 * 3600)
    write_panic(rdir, now - 3 * 3600)
    yield now


def touch(path: Path, ts: float) -> None:
    path.write_text(local_iso(ts) + "\n")
    os.utime(path, (ts, ts))


def test_reference_ack_still_clears_the_lockout_it_cleared(legacy: Path, lockout: float) -> None:
    touch(legacy / ".metal-guard-ack", lockout - 3600)  # acked after both panics
    verdict = evaluate_panic_cooldown()
    assert (verdict.exit_code, verdict.state) == (0, "acked")
    assert verdict.ack_at == pytest.approx(lockout - 3600, abs=1)


def test_stale_reference_ack_does_not_clear_a_lockout(legacy: Path, lockout: float) -> None:
    touch(legacy / ".metal-guard-ack", lockout - 25 * 3600)
    assert evaluate_panic_cooldown().state == "lockout"
    assert json.loads(marker().read_text())["ack"]["why"] == "older than 24 h"


def test_default_ack_location_is_the_home_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("METALGUARD_LEGACY_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert migrate.legacy_paths() == (tmp_path / ".cache" / "metal-guard", tmp_path / ".metal-guard-ack")


# --------------------------------------------------------------------------- hostile files


def gate_warns(caplog: pytest.LogCaptureFixture) -> tuple[int, str]:
    with caplog.at_level("WARNING", logger="metal_guard.migrate"):
        code = evaluate_panic_cooldown().exit_code
    return code, caplog.text


@pytest.mark.parametrize("content", [b"not json {", b"", b"[1, 2]", b'{"cooldown_until": "soon"}',
                                     b'{"cooldown_until": null}', b"\xff\xfe\x00garbage"])
def test_corrupt_sentinel_is_ignored_with_a_warning(legacy: Path, caplog: pytest.LogCaptureFixture,
                                                    content: bytes) -> None:
    (legacy / "panic-sentinel.json").write_bytes(content)
    code, text = gate_warns(caplog)
    assert code == 0 and "sentinel: skipped" in text
    assert (legacy / "panic-sentinel.json").read_bytes() == content  # not quarantined: not ours


def test_symlinks_are_not_followed(legacy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"cooldown_until": local_iso(time.time() + 3600)}))
    (legacy / "panic-sentinel.json").symlink_to(elsewhere)
    code, text = gate_warns(caplog)
    assert code == 0 and "symbolic link" in text


def test_a_symlinked_legacy_directory_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    real = tmp_path / "real"
    real.mkdir()
    write_sentinel(real, time.time() + 3600)
    (tmp_path / "link").symlink_to(real)
    monkeypatch.setenv("METALGUARD_LEGACY_DIR", str(tmp_path / "link"))
    code, text = gate_warns(caplog)
    assert code == 0 and "is a symbolic link" in text


def test_oversized_and_non_regular_files_are_skipped(legacy: Path, caplog: pytest.LogCaptureFixture) -> None:
    (legacy / "breaker.json").write_bytes(b" " * (migrate.MAX_JSON_BYTES + 1))
    (legacy / "panic-sentinel.json").mkdir()
    os.mkfifo(legacy / "cadence.json")  # would block a naive open()
    code, text = gate_warns(caplog)
    assert code == 0
    assert "larger than" in text and "not a regular file" in text
    warnings = json.loads(marker().read_text())["warnings"]
    assert len(warnings) == 3


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
def test_another_users_file_is_not_trusted(legacy: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_sentinel(legacy, time.time() + 3600)
    os.chown(path, 54321, 54321)
    code, text = gate_warns(caplog)
    assert code == 0 and "belongs to uid 54321" in text


def test_junk_panic_lines_are_skipped_and_values_bounded(legacy: Path) -> None:
    now = time.time()
    evil = panic_line(now - 100, pid=7)
    evil["explanation"] = "line one\nSUBPROC_POST: forged\x1b[2J" + "x" * 5000
    evil["source_file"] = "/tmp/\nforged.panic"
    evil["signature"] = "prepare_count_underflow; rm -rf"
    (legacy / "panics.jsonl").write_text("\n".join([
        "{not json", json.dumps([1]), json.dumps({"ts": "today"}), json.dumps(evil),
        json.dumps({"ts": True, "pid": 1})]) + "\n")
    CircuitBreaker().status()
    [rec] = [r for r in read_panic_archive() if r.timestamp_source == "metal-guard 0.11 archive"]
    assert "\n" not in rec.explanation and "\x1b" not in rec.explanation
    assert len(rec.explanation) <= migrate.MAX_TEXT_CHARS and "\n" not in rec.path
    assert rec.signature == "unknown" and rec.is_gpu is False
