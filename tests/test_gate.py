"""forensics.gate (L10/L10b): staircase, sentinel, ack, kill switch, broken gate; injected clock."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from report_factory import (
    PENDING_219,
    REMOVE_323,
    UNDERFLOW_492,
    UNDERFLOW_550,
    WATCHDOG,
    copy_fixtures,
    write_metal_abort,
    write_panic,
)

from metal_guard.errors import PanicCooldownActive
from metal_guard.forensics import gate, reports
from metal_guard.forensics.gate import (
    CooldownVerdict,
    ack_panic_lockout,
    clear_panic_ack,
    clear_panic_sentinel,
    evaluate_panic_cooldown,
    mark_panic_sentinel_cooldown,
    read_panic_sentinel,
    scan_recent_aborts,
    scan_recent_panics,
)
from metal_guard.settings import get_settings

H = 3600.0
NOW = datetime.fromisoformat("2026-08-20T12:00:00+00:00").timestamp()


def verdict(at: float = NOW, **overrides: object) -> CooldownVerdict:
    return evaluate_panic_cooldown(now=at, settings=get_settings(**overrides) if overrides else None)


def test_no_panics_proceeds(rdir: Path) -> None:
    v = verdict()
    assert (v.exit_code, v.state, v.recent_panics_72h, v.cooldown_until) == (0, "proceed", 0, None)
    assert v.proceed and v.remaining_sec == 0


def test_one_panic_gives_stage1_cooldown_from_the_panic_time(rdir: Path) -> None:
    write_panic(rdir, NOW - 0.5 * H)
    v = verdict()
    assert (v.exit_code, v.state, v.recent_panics_24h) == (2, "cooldown", 1)
    assert v.cooldown_until == pytest.approx(NOW + 1.5 * H)
    assert v.remaining_sec == pytest.approx(1.5 * H)
    assert verdict(NOW + 1.5 * H + 1).exit_code == 0
    assert verdict(NOW + 1.4 * H).exit_code == 2


def test_stage1_hours_come_from_settings(rdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_panic(rdir, NOW - 3 * H)
    assert verdict().exit_code == 0
    monkeypatch.setenv("METALGUARD_PANIC_COOLDOWN_STAGE1_H", "4")
    assert verdict().cooldown_until == pytest.approx(NOW + H)


@pytest.mark.parametrize("line", [UNDERFLOW_550, UNDERFLOW_492, PENDING_219, REMOVE_323])
def test_every_iogpu_signature_counts(rdir: Path, line: str) -> None:
    write_panic(rdir, NOW - H, line)
    assert verdict().recent_panics_24h == 1


def test_unrelated_panics_do_not_count(rdir: Path) -> None:
    write_panic(rdir, NOW - H, WATCHDOG)
    v = verdict()
    assert (v.exit_code, v.recent_panics_72h) == (0, 0)
    assert len(scan_recent_panics(now=NOW, gpu_only=False)) == 1
    assert scan_recent_panics(now=NOW) == []


def test_two_in_24h_lock_out_until_ack(rdir: Path) -> None:
    write_panic(rdir, NOW - 20 * H, UNDERFLOW_550)
    write_panic(rdir, NOW - 5 * H, PENDING_219)
    v = verdict()
    assert (v.exit_code, v.state, v.recent_panics_24h) == (2, "lockout", 2)
    assert v.cooldown_until == pytest.approx(NOW - 20 * H + 72 * H)
    assert "metal-guard ack" in v.reason
    ack_panic_lockout(now=NOW)
    acked = verdict(NOW + 60)
    assert (acked.exit_code, acked.state) == (0, "acked")
    assert acked.ack_at == pytest.approx(NOW)
    assert verdict(NOW + 25 * H).state != "acked"  # the ack is only good for 24 h
    clear_panic_ack()
    assert verdict(NOW + 60).exit_code == 2


def test_ack_older_than_the_latest_panic_does_not_clear(rdir: Path) -> None:
    ack_panic_lockout(now=NOW - 10 * H)
    write_panic(rdir, NOW - 20 * H)
    write_panic(rdir, NOW - 5 * H)
    assert verdict().state == "lockout"


def test_three_in_72h_lock_out_and_expire_after_max_hours(rdir: Path) -> None:
    for hours_ago in (40, 30, 26):
        write_panic(rdir, NOW - hours_ago * H)
    v = verdict()
    assert (v.state, v.recent_panics_24h, v.recent_panics_72h) == ("lockout", 0, 3)
    assert v.cooldown_until == pytest.approx(NOW - 40 * H + 72 * H)
    short = verdict(NOW, panic_lockout_max_h=48.0)
    assert short.exit_code == 2 and short.cooldown_until == pytest.approx(NOW + 8 * H)
    assert verdict(NOW + 8 * H + 1, panic_lockout_max_h=48.0).exit_code == 0
    assert verdict(NOW + 8 * H + 1).exit_code == 2


def test_thresholds_come_from_settings(rdir: Path) -> None:
    write_panic(rdir, NOW - 20 * H)
    write_panic(rdir, NOW - 10 * H)
    assert verdict(panic_lockout_24h_n=3).state == "proceed"
    assert verdict(panic_lockout_24h_n=3, panic_lockout_72h_n=2).state == "lockout"


def test_sentinel_holds_and_is_never_shortened(rdir: Path) -> None:
    path = mark_panic_sentinel_cooldown(2.0, now=NOW, reason="postmortem")
    state = json.loads(path.read_text())
    assert state["cooldown_until_ts"] == pytest.approx(NOW + 2 * H)  # the bash wrapper reads this
    v = verdict(NOW + H)
    assert (v.exit_code, v.state) == (2, "cooldown") and "sentinel" in v.reason
    mark_panic_sentinel_cooldown(0.5, now=NOW)  # shorter: ignored
    assert read_panic_sentinel()["cooldown_until_ts"] == pytest.approx(NOW + 2 * H)  # type: ignore[index]
    mark_panic_sentinel_cooldown(5.0, now=NOW)
    assert verdict(NOW + 4 * H).exit_code == 2
    assert verdict(NOW + 5 * H + 1).exit_code == 0
    assert clear_panic_sentinel() is True and clear_panic_sentinel() is False
    assert verdict(NOW + H).exit_code == 0
    with pytest.raises(ValueError):
        mark_panic_sentinel_cooldown(-1)


def test_sentinel_and_lockout_combine(rdir: Path) -> None:
    write_panic(rdir, NOW - 2 * H)
    write_panic(rdir, NOW - H)
    mark_panic_sentinel_cooldown(100.0, now=NOW)
    v = verdict()
    assert v.state == "lockout" and v.cooldown_until == pytest.approx(NOW + 100 * H)
    ack_panic_lockout(now=NOW)
    assert verdict(NOW + 60).state == "cooldown"  # the ack clears the lockout, not the sentinel


def test_kill_switch_always_proceeds(rdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_panic(rdir, NOW - H)
    write_panic(rdir, NOW - 2 * H)
    monkeypatch.setenv("METALGUARD_PANIC_GATE_DISABLED", "1")
    v = verdict()
    assert (v.exit_code, v.state) == (0, "disabled")


def test_aborts_are_counted_but_do_not_gate(rdir: Path) -> None:
    write_metal_abort(rdir, NOW - H)
    write_metal_abort(rdir, NOW - 30 * H, app="python3.12")  # outside 24 h
    v = verdict()
    assert (v.exit_code, v.abort_count_24h) == (0, 1)
    assert "abort" in v.reason
    aborts = scan_recent_aborts(now=NOW)
    assert len(aborts) == 1 and aborts[0].extra["queue"] == "com.Metal.CompletionQueueDispatch"


def test_fixture_directory_verdicts(rdir: Path) -> None:
    copy_fixtures(rdir)
    at = datetime.fromisoformat("2026-08-20T15:00:00+00:00").timestamp()
    v = verdict(at)
    # 08-19 05:09 (492), 08-19 17:03 (219), 08-20 13:58 (550 + its truncated copy); 08-17 (323) is > 72 h
    assert (v.state, v.recent_panics_24h, v.recent_panics_72h) == ("lockout", 3, 4)
    assert v.abort_count_24h == 0  # the .ips files are dated after 15:00 UTC
    later = verdict(datetime.fromisoformat("2026-08-20T17:00:00+00:00").timestamp())
    assert later.abort_count_24h == 3  # Metal SIGABRT .ips + text crash + gpuEvent


def test_reports_dir_that_is_not_a_directory_breaks_the_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bogus = tmp_path / "not-a-dir"
    bogus.write_text("")
    monkeypatch.setenv("METALGUARD_DIAGNOSTIC_REPORTS_DIRS", str(bogus))
    v = verdict()
    assert (v.exit_code, v.state) == (3, "broken") and v.errors


def test_unreadable_recent_report_breaks_the_gate_unless_already_cooling(
    rdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_panic(rdir, NOW - 30 * H)

    def deny(path: object, max_bytes: int = 0, **kw: object) -> tuple[bytes, int, float]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(reports, "read_report_bytes", deny)
    assert verdict().exit_code == 3
    mark_panic_sentinel_cooldown(1.0, now=NOW)
    v = verdict()
    assert v.exit_code == 2 and v.errors  # a known cooldown wins; the errors stay visible


def test_invalid_setting_breaks_the_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_PANIC_LOCKOUT_24H_N", "lots")
    v = evaluate_panic_cooldown(now=NOW)
    assert v.exit_code == 3 and "METALGUARD_PANIC_LOCKOUT_24H_N" in v.reason


def test_internal_failure_is_broken_not_proceed(rdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("parser bug")

    monkeypatch.setattr(reports, "scan_reports", boom)
    v = verdict()
    assert v.exit_code == 3 and "parser bug" in v.reason


def test_verdict_feeds_panic_cooldown_active(rdir: Path) -> None:
    write_panic(rdir, NOW - 0.5 * H)
    v = verdict()
    exc = PanicCooldownActive(v)
    assert exc.cooldown_until == v.cooldown_until and exc.remaining_sec == pytest.approx(1.5 * H)
    data = v.to_dict(include_records=True)
    assert data["cooldown_until_iso"].startswith("2026-08-20T13:30") and len(data["panics"]) == 1


def test_state_files_live_in_the_state_dir(rdir: Path) -> None:
    s = get_settings()
    assert ack_panic_lockout(now=NOW).parent == s.state_dir
    assert mark_panic_sentinel_cooldown(1, now=NOW).parent == s.state_dir
    assert gate.SENTINEL_FILE != gate.ACK_FILE


def test_gate_imports_neither_mlx_nor_heavy_modules(rdir: Path) -> None:
    write_panic(rdir, NOW - H)
    code = ("import sys; from metal_guard.cli import main; rc = main(['panic-gate']); "
            "print(rc, sorted(m for m in ('mlx', 'mlx.core', 'wrapt', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stderr
