"""L9 circuit breaker and panic archive, driven by an injected clock (no sleeps)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from metal_guard import storage
from metal_guard.breaker import CircuitBreaker, ingest_panics_jsonl, read_panic_archive
from metal_guard.errors import MLXCooldownActive, SettingsError
from metal_guard.forensics.records import PROCESS_CRASH, PanicRecord
from metal_guard.settings import get_settings

T0 = 1_800_000_000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def gpu_panic(ts: float, n: int = 0, **kw) -> PanicRecord:
    return PanicRecord(
        path=f"/Library/Logs/DiagnosticReports/panic-full-{n}.panic", timestamp=ts, is_gpu=True,
        signature="prepare_count_underflow", report_id=kw.pop("report_id", f"incident-{n}"), **kw,
    )


def other_panic(ts: float, n: int = 0) -> PanicRecord:
    return PanicRecord(path=f"/x/panic-{n}.panic", timestamp=ts, is_gpu=False, report_id=f"other-{n}")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breaker(clock) -> CircuitBreaker:
    return CircuitBreaker(clock=clock, auto_ingest=False)


# --------------------------------------------------------------------------- configuration


def test_defaults_from_settings(monkeypatch):
    b = CircuitBreaker()
    assert (b.window_sec, b.panic_threshold, b.cooldown_sec) == (3600.0, 2, 3600.0)
    s = get_settings()
    assert b.state_path == s.state_file("breaker.json") and b.jsonl_path == s.state_file("panics.jsonl")
    monkeypatch.setenv("METALGUARD_BREAKER_THRESHOLD", "5")
    monkeypatch.setenv("METALGUARD_BREAKER_WINDOW_SEC", "60")
    b = CircuitBreaker(cooldown_sec=10)
    assert (b.window_sec, b.panic_threshold, b.cooldown_sec) == (60.0, 5, 10.0)


@pytest.mark.parametrize("raw", ["-1", "x", "0"])
def test_bad_env_is_a_settings_error(monkeypatch, raw):
    monkeypatch.setenv("METALGUARD_BREAKER_THRESHOLD", raw)
    with pytest.raises(SettingsError):
        CircuitBreaker()


@pytest.mark.parametrize(("kw", "value"), [("window_sec", 0), ("panic_threshold", 1.5),
                                           ("panic_threshold", 0), ("cooldown_sec", -1),
                                           ("cooldown_sec", float("nan"))])
def test_bad_arguments(kw, value):
    with pytest.raises(SettingsError):
        CircuitBreaker(**{kw: value})


# --------------------------------------------------------------------------- the state machine


def test_window_threshold_and_cooldown_with_injected_clock(breaker, clock):
    assert breaker.check()["state"] == "closed"
    ingest_panics_jsonl(records=[gpu_panic(T0 - 3000, 1)])
    status = breaker.check()
    assert status["recent_panic_count"] == 1 and not status["in_cooldown"]
    # Second GPU panic, 50 min after the first: within the 1 h window -> trips at its time.
    ingest_panics_jsonl(records=[gpu_panic(T0, 2)])
    with pytest.raises(MLXCooldownActive) as err:
        breaker.check()
    exc = err.value
    assert exc.remaining_sec == pytest.approx(3600.0)
    assert exc.cooldown_until == pytest.approx(T0 + 3600)
    assert exc.panic_count == 2 and exc.window_sec == 3600.0
    assert "3600s remaining" in str(exc)
    persisted = json.loads(breaker.state_path.read_text())
    assert persisted["cooldown_until"] == pytest.approx(T0 + 3600)
    assert persisted["panic_count"] == 2 and persisted["threshold"] == 2
    clock.t += 1800
    with pytest.raises(MLXCooldownActive) as err:
        breaker.check()
    assert err.value.remaining_sec == pytest.approx(1800.0)
    st = breaker.status()
    assert st["in_cooldown"] and st["cooldown_remaining_sec"] == pytest.approx(1800.0)
    clock.t += 1800
    assert breaker.check()["in_cooldown"] is False


def test_failures_further_apart_than_the_window_do_not_trip(breaker, clock):
    ingest_panics_jsonl(records=[gpu_panic(T0 - 3700, 1), gpu_panic(T0, 2)])
    status = breaker.check()
    assert not status["in_cooldown"] and status["recent_panic_count"] == 1


def test_cooldown_runs_from_the_tripping_failure_not_from_the_check(breaker, clock):
    ingest_panics_jsonl(records=[gpu_panic(T0 - 3000, 1), gpu_panic(T0 - 2900, 2)])
    with pytest.raises(MLXCooldownActive) as err:
        breaker.check()
    assert err.value.cooldown_until == pytest.approx(T0 - 2900 + 3600)
    clock.t = T0 + 701
    assert breaker.check()["in_cooldown"] is False


def test_unrelated_panics_are_kept_but_do_not_count(breaker, clock):
    added = ingest_panics_jsonl(records=[other_panic(T0 - 10, 1), other_panic(T0 - 5, 2), gpu_panic(T0, 3)])
    assert added == 3
    status = breaker.check()
    assert not status["in_cooldown"]
    assert status["recent_panic_count"] == 1 and status["recent_ignored_panic_count"] == 2
    assert len(read_panic_archive()) == 3


def test_record_failure_counts_worker_crashes(breaker, clock):
    status = breaker.record_failure("worker_crash", "SIGABRT in mlx::core::gpu::check_error", pid=4242)
    assert not status["in_cooldown"] and status["recent_crash_count"] == 1
    clock.t += 60
    status = breaker.record_failure("worker_crash", "SIGSEGV", pid=4243)
    assert status["in_cooldown"] and status["cooldown_until"] == pytest.approx(T0 + 60 + 3600)
    with pytest.raises(MLXCooldownActive):
        breaker.check()
    # A crash and a GPU panic count the same.
    breaker.clear()
    clock.t += 1  # failures strictly after the clear count
    breaker.record_failure("worker_crash", pid=1)
    ingest_panics_jsonl(records=[gpu_panic(clock.t, 9)])
    with pytest.raises(MLXCooldownActive):
        breaker.check()


def test_crash_report_of_a_recorded_crash_counts_once(breaker, clock):
    breaker.record_failure("worker_crash", "SIGABRT", pid=777)
    ips = PanicRecord(path="/x/Python-2026.ips", timestamp=T0 + 2, kind=PROCESS_CRASH, is_gpu=True,
                      pid=777, report_id="ips-1")
    ingest_panics_jsonl(records=[ips])
    status = breaker.check()
    assert not status["in_cooldown"] and status["recent_failure_count"] == 1


def test_clear_is_an_operator_override(breaker, clock):
    ingest_panics_jsonl(records=[gpu_panic(T0 - 10, 1), gpu_panic(T0, 2)])
    with pytest.raises(MLXCooldownActive):
        breaker.check()
    breaker.clear()
    status = breaker.check()
    assert not status["in_cooldown"] and status["recent_failure_count"] == 0
    assert status["cleared_at"] == T0
    clock.t += 10
    ingest_panics_jsonl(records=[gpu_panic(clock.t, 3)])
    assert not breaker.check()["in_cooldown"]  # one new panic: below the threshold again
    clock.t += 10
    ingest_panics_jsonl(records=[gpu_panic(clock.t, 4)])
    with pytest.raises(MLXCooldownActive):
        breaker.check()


def test_trip_is_visible_to_other_instances_and_status_is_read_only(breaker, clock, tmp_path):
    ingest_panics_jsonl(records=[gpu_panic(T0 - 10, 1), gpu_panic(T0, 2)])
    assert breaker.status()["in_cooldown"]
    assert not breaker.state_path.exists()  # status() persisted nothing
    with pytest.raises(MLXCooldownActive):
        breaker.check()
    # Another process that cannot see the archive still sees the persisted trip.
    other = CircuitBreaker(clock=clock, auto_ingest=False, jsonl_path=tmp_path / "empty.jsonl")
    with pytest.raises(MLXCooldownActive):
        other.check()


def test_future_timestamps_do_not_extend_the_cooldown(breaker, clock):
    ingest_panics_jsonl(records=[gpu_panic(T0, 1), gpu_panic(T0 + 10 * 86400, 2)])
    with pytest.raises(MLXCooldownActive) as err:
        breaker.check()
    assert err.value.cooldown_until == pytest.approx(T0 + 3600)


# --------------------------------------------------------------------------- ingest


def test_ingest_dedupes_by_identity(tmp_path):
    path = tmp_path / "p.jsonl"
    recs = [gpu_panic(T0, 1), gpu_panic(T0 + 5, 2)]
    assert ingest_panics_jsonl(jsonl_path=path, records=recs) == 2
    assert ingest_panics_jsonl(jsonl_path=path, records=recs) == 0
    # Same incident seen again under another path (moved to Retired/): still a duplicate.
    moved = PanicRecord(path="/Library/Logs/DiagnosticReports/Retired/panic-full-1.panic",
                        timestamp=T0, is_gpu=True, report_id="incident-1")
    assert ingest_panics_jsonl(jsonl_path=path, records=[moved, moved]) == 0
    # Seed-format lines (no report_id) dedupe on path + second, and on kind + second + pid.
    seed = {"ts": T0 + 100, "signature": "pending_memory_set", "explanation": "", "pid": 5,
            "source_file": "/a.panic"}
    assert ingest_panics_jsonl(jsonl_path=path, records=[seed]) == 1
    assert ingest_panics_jsonl(jsonl_path=path, records=[dict(seed, source_file="/b.panic")]) == 0
    archived = read_panic_archive(path)
    assert [r.identity for r in archived] == ["incident-1", "incident-2", "/a.panic@1800000100"]
    assert archived[2].is_gpu  # a seed line with a known signature is a GPU panic


def test_ingest_skips_junk_records_and_lines(tmp_path, caplog):
    path = tmp_path / "p.jsonl"
    path.write_text('{"ts": 1.0, "signature": "x", "source_file": "/s"}\nnot json\n[1,2]\n{"no": "ts"}\n{"ts": 2')
    with caplog.at_level("WARNING"):
        assert ingest_panics_jsonl(jsonl_path=path, records=[{"bogus": 1}, gpu_panic(T0, 1)]) == 1
    assert "cannot be read" in caplog.text
    # The junk lines were moved aside with the file (one warning); the good records remain.
    assert len(list(tmp_path.glob("p.jsonl.corrupt-*"))) == 1
    assert sum("moved to" in r.getMessage() for r in caplog.records) == 1
    assert [r.identity for r in read_panic_archive(path)] == ["/s@1", "incident-1"]
    assert len(path.read_text().splitlines()) == 2


def test_check_repairs_a_torn_archive_once(breaker, caplog):
    breaker.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
    good = json.dumps(gpu_panic(T0 - 5, 1).to_dict())
    # a record torn by a crash, then healed onto its own line by the next append
    breaker.jsonl_path.write_text(good[: len(good) // 2] + "\n" + good + "\n")
    with caplog.at_level("WARNING"):
        assert breaker.status()["recent_panic_count"] == 1  # status() is read-only
        assert not list(breaker.jsonl_path.parent.glob("panics.jsonl.corrupt-*"))
        breaker.check()
        breaker.check()
    assert len(list(breaker.jsonl_path.parent.glob("panics.jsonl.corrupt-*"))) == 1
    assert sum("moved to" in r.getMessage() for r in caplog.records) == 1
    assert len(read_panic_archive(breaker.jsonl_path)) == 1


def test_an_unterminated_last_record_is_skipped_not_repaired(breaker):
    # it may be an append in progress: skipped by readers, never counted as corruption
    breaker.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
    good = json.dumps(gpu_panic(T0 - 5, 1).to_dict())
    breaker.jsonl_path.write_text(good + "\n" + good[: len(good) // 2])
    assert breaker.check()["recent_panic_count"] == 1
    assert not list(breaker.jsonl_path.parent.glob("panics.jsonl.corrupt-*"))


def test_ingest_without_a_report_parser_is_harmless(tmp_path, monkeypatch):
    # records=None scans reports; a failing or missing parser means nothing was found.
    import metal_guard.breaker as breaker_mod

    def broken(*_a, **_k):
        raise PermissionError("Full Disk Access needed")

    monkeypatch.setattr(breaker_mod, "_parse_reports", broken)
    assert ingest_panics_jsonl(jsonl_path=tmp_path / "p.jsonl") == 0
    b = CircuitBreaker(jsonl_path=tmp_path / "p.jsonl")  # auto_ingest on
    assert b.check()["in_cooldown"] is False


def test_check_auto_ingests_parsed_reports(tmp_path, monkeypatch, clock):
    import metal_guard.breaker as breaker_mod

    calls = []

    def parser(report_dir, since_ts, scan_errors=None):
        calls.append(since_ts)
        return [gpu_panic(T0 - 20, 1), gpu_panic(T0 - 10, 2)]

    monkeypatch.setattr(breaker_mod, "_parse_reports", parser)
    b = CircuitBreaker(clock=clock)
    with pytest.raises(MLXCooldownActive):
        b.check()
    assert calls == [T0 - 7200]
    assert len(read_panic_archive()) == 2


def test_check_ingests_real_report_files(monkeypatch, tmp_path):
    """The real parser on realistic report fixtures: two IOGPU panics in one window trip it."""
    import shutil
    from pathlib import Path

    fixtures = Path(__file__).parent / "fixtures" / "reports"
    reports = tmp_path / "reports"
    shutil.copytree(fixtures, reports)
    monkeypatch.setenv("METALGUARD_DIAGNOSTIC_REPORTS_DIRS", str(reports))
    t_panics = 1787234321.0  # two GPU panic reports carry this header time
    b = CircuitBreaker(clock=Clock(t_panics + 100))
    with pytest.raises(MLXCooldownActive) as err:
        b.check()
    assert err.value.cooldown_until == pytest.approx(t_panics + 3600)
    archived = read_panic_archive()
    assert sum(r.is_gpu for r in archived) == 2
    assert any(not r.is_gpu for r in archived)  # unrelated panics are archived, not counted
    assert b.ingest(now=t_panics + 100) == 0  # a re-scan adds nothing


def test_concurrent_ingest_from_processes_does_not_duplicate(tmp_path):
    path = tmp_path / "p.jsonl"
    code = (
        "import sys\n"
        "from metal_guard.breaker import ingest_panics_jsonl\n"
        "from metal_guard.forensics.records import PanicRecord\n"
        "recs=[PanicRecord(path=f'/r/{i}.panic', timestamp=1000.0+i, is_gpu=True, report_id=f'id{i}') for i in range(40)]\n"
        "print(ingest_panics_jsonl(jsonl_path=sys.argv[1], records=recs))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    added = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert sum(added) == 40
    assert len(storage.read_jsonl(path)) == 40


# --------------------------------------------------------------------------- bad state


@pytest.mark.parametrize("content", ["", "{", "[]", '{"cooldown_until": "soon"}',
                                     '{"failures": [{"ts": "x"}]}', '{"failures": 3}'])
def test_corrupt_or_foreign_state_is_quarantined(breaker, clock, content, caplog):
    breaker.state_path.parent.mkdir(parents=True, exist_ok=True)
    breaker.state_path.write_text(content)
    with caplog.at_level("WARNING", logger="metal_guard.storage"):
        assert breaker.check()["in_cooldown"] is False
    assert sum("moved to" in r.getMessage() for r in caplog.records) == 1
    assert list(breaker.state_path.parent.glob("breaker.json.corrupt-*"))
    breaker.record_failure("worker_crash")
    assert json.loads(breaker.state_path.read_text())["failures"][0]["kind"] == "worker_crash"


def test_record_failure_rejects_empty_kind(breaker):
    with pytest.raises(ValueError):
        breaker.record_failure("")


# --------------------------------------------------------------------------- doctor / CLI


def test_doctor_section_and_breaker_command(capsys):
    import argparse
    import time

    from metal_guard.cadence import CadenceGuard
    from metal_guard.cli.state import _run_breaker, doctor_section

    CadenceGuard().mark_load("m")
    section = doctor_section()
    assert section["breaker_in_cooldown"] is False and section["cadence_entries"] == 1
    assert section["breaker"].startswith("closed")
    now = time.time()
    ingest_panics_jsonl(records=[gpu_panic(now - 20, 1), gpu_panic(now - 10, 2)])
    section = doctor_section()
    assert section["breaker_in_cooldown"] is True and section["breaker"].startswith("OPEN")
    assert _run_breaker(argparse.Namespace(action="status", json=False)) == 2
    assert "breaker OPEN" in capsys.readouterr().out
    assert _run_breaker(argparse.Namespace(action="check", json=True)) == 2
    assert json.loads(capsys.readouterr().out)["in_cooldown"] is True
    assert _run_breaker(argparse.Namespace(action="clear", json=False)) == 0
    assert "breaker cleared" in capsys.readouterr().out
    assert _run_breaker(argparse.Namespace(action="check", json=False)) == 0
    assert doctor_section()["breaker_in_cooldown"] is False


def test_register_adds_lock_and_breaker_subcommands():
    import argparse

    from metal_guard.cli import _Parser
    from metal_guard.cli.state import register

    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true")
    parser = _Parser(prog="metal-guard")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub._metal_guard_common = common  # type: ignore[attr-defined]
    register(sub)
    args = parser.parse_args(["breaker", "clear", "--json"])
    assert args.action == "clear" and args.json is True and callable(args.func)
    assert parser.parse_args(["lock"]).func.__name__ == "_run_lock"
    assert isinstance(args, argparse.Namespace)


def test_status_is_a_dataclass_with_the_0_11_dict_view(tmp_path, capsys):
    """status() is a BreakerStatus; as_dict() and the --json output carry exactly the keys the
    dict had; reading it as a dict keeps working (the 0.11 README's dashboard use)."""
    import argparse
    import dataclasses
    import json

    from metal_guard.breaker import BreakerStatus
    from metal_guard.cli.state import _run_breaker

    keys = {"in_cooldown", "state", "cooldown_until", "cooldown_remaining_sec", "tripped_at",
            "trip_failure_count", "panic_threshold", "window_sec", "cooldown_sec",
            "recent_panic_count", "recent_crash_count", "recent_failure_count",
            "recent_ignored_panic_count", "cleared_at", "state_path", "jsonl_path"}
    breaker = CircuitBreaker(auto_ingest=False)
    status = breaker.status(now=1000.0)
    assert isinstance(status, BreakerStatus) and status.in_cooldown is False
    assert set(status.as_dict()) == keys and set(status) == keys
    assert status["state"] == "closed" and status.get("report_scan_errors") is None
    assert dict(status) == status.as_dict() and status == status.as_dict()
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.in_cooldown = True  # type: ignore[misc]
    checked = breaker.check(now=1000.0)
    assert checked.report_scan_errors == [] and set(checked.as_dict()) == keys | {"report_scan_errors"}
    assert _run_breaker(argparse.Namespace(action="status", json=True)) == 0
    assert set(json.loads(capsys.readouterr().out)) == keys
    assert _run_breaker(argparse.Namespace(action="check", json=True)) == 0
    assert set(json.loads(capsys.readouterr().out)) == keys | {"report_scan_errors"}
