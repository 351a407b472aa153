"""forensics.orphans (L11): PRE/POST pairing, process identity, and --kill safety."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import psutil
import pytest
from support import argv_visible, at, sleeping_child, write_crumbs

from metal_guard.breadcrumbs import format_line
from metal_guard.forensics.orphans import (
    GONE,
    RUNNING,
    UNKNOWN,
    kill_orphans,
    pair_breadcrumbs,
    scan_orphan_subproc_pre,
)
from metal_guard.settings import get_settings


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    with sleeping_child(120) as proc:
        yield proc


def test_pre_without_post_after_threshold_is_an_orphan() -> None:
    now = time.time()
    write_crumbs([
        format_line("SUBPROC_PRE", "mlx-community/a", now=at(now - 300)),
        format_line("SUBPROC_PRE", "mlx-community/b", now=at(now - 200)),
        format_line("SUBPROC_POST", "mlx-community/b", now=at(now - 190)),
        format_line("SUBPROC_PRE", "mlx-community/c", now=at(now - 10)),  # younger than 90 s
        "garbage line that is not a breadcrumb",
    ])
    orphans = scan_orphan_subproc_pre(now=now)
    assert [o.model_id for o in orphans] == ["mlx-community/a"]
    assert orphans[0].age_sec == pytest.approx(300, abs=0.01)
    assert orphans[0].status == UNKNOWN
    assert [o.model_id for o in scan_orphan_subproc_pre(now=now, threshold_sec=5)] == [
        "mlx-community/a", "mlx-community/c"]


def test_fifo_pairing_per_model_and_pid_pairing() -> None:
    t = 1_787_000_000.0
    lines = [
        format_line("SUBPROC_PRE", "m", now=at(t), pid=11),
        format_line("SUBPROC_PRE", "m", now=at(t + 1), pid=22),
        format_line("SUBPROC_POST", "m", now=at(t + 2), pid=22),  # closes pid 22, not the oldest
        format_line("SUBPROC_PRE", "n", now=at(t + 3)),
        format_line("SUBPROC_PRE", "n", now=at(t + 4)),
        format_line("SUBPROC_POST", "n", now=at(t + 5)),  # FIFO: closes the t+3 one
        format_line("SUBPROC_POST", "zzz", now=at(t + 6)),  # unmatched POST is ignored
    ]
    assert [(m, ts - t, pid) for m, ts, pid, _ct in pair_breadcrumbs(lines)] == [("m", 0, 11), ("n", 4, None)]


def test_kill_switch_and_threshold_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    write_crumbs([format_line("SUBPROC_PRE", "m", now=at(now - 100))])
    assert len(scan_orphan_subproc_pre(now=now)) == 1
    monkeypatch.setenv("METALGUARD_SUBPROC_ORPHAN_THRESHOLD_SEC", "200")
    assert scan_orphan_subproc_pre(now=now) == []
    monkeypatch.setenv("METALGUARD_SUBPROC_ORPHAN_WATCH_DISABLED", "1")
    assert scan_orphan_subproc_pre(now=now, threshold_sec=1) == []


def test_ready_line_supplies_identity_and_status(sleeper: subprocess.Popen[bytes]) -> None:
    ct = psutil.Process(sleeper.pid).create_time()
    now = time.time()
    write_crumbs([
        format_line("SUBPROCESS_WORKER", "m ready", now=at(now - 200), pid=sleeper.pid, create_time=ct),
        format_line("SUBPROC_PRE", "m", now=at(now - 150), pid=sleeper.pid),
        "[2026-01-01 10:00:00] SUBPROCESS_WORKER: legacy ready, pid=999999",  # seed format
        format_line("SUBPROC_PRE", "legacy", now=at(now - 150), pid=999999),
    ])
    by_model = {o.model_id: o for o in scan_orphan_subproc_pre(now=now)}
    assert by_model["m"].status == RUNNING and by_model["m"].create_time == pytest.approx(ct)
    assert by_model["legacy"].status == GONE and by_model["legacy"].create_time is None


def test_reused_pid_is_gone(sleeper: subprocess.Popen[bytes]) -> None:
    now = time.time()
    write_crumbs([
        format_line("SUBPROCESS_WORKER", "m ready", now=at(now - 200), pid=sleeper.pid, create_time=12345.0),
        format_line("SUBPROC_PRE", "m", now=at(now - 150), pid=sleeper.pid),
    ])
    [orphan] = scan_orphan_subproc_pre(now=now)
    assert orphan.status == GONE


@pytest.fixture
def fake_worker() -> Iterator[subprocess.Popen[bytes]]:
    """A sleeping process whose command line is that of an isolation worker of model "m"."""
    with sleeping_child(120, ["-m", "metal_guard.isolation.worker", "--config",
                              '{"model_id": "m"}']) as proc:
        yield argv_visible(proc)


def test_kill_only_signals_a_matching_create_time(fake_worker: subprocess.Popen[bytes],
                                                  sleeper: subprocess.Popen[bytes]) -> None:
    # the right create_time is not enough: a process that is not a worker is never signalled
    ct_other = psutil.Process(sleeper.pid).create_time()
    now = time.time()
    write_crumbs([format_line("SUBPROC_PRE", "m", now=at(now - 150), pid=sleeper.pid,
                              create_time=ct_other)])
    [not_worker] = scan_orphan_subproc_pre(now=now)
    assert not_worker.status == RUNNING
    [result] = kill_orphans([not_worker])
    assert result["action"] == "skipped: not a metal-guard worker (command line)"
    assert sleeper.poll() is None
    get_settings().resolved_breadcrumb_path.unlink()

    sleeper = fake_worker
    ct = psutil.Process(sleeper.pid).create_time()
    now = time.time()
    write_crumbs([format_line("SUBPROCESS_WORKER", "m ready", now=at(now - 200), pid=sleeper.pid,
                              create_time=ct + 5.0),
                  format_line("SUBPROC_PRE", "m", now=at(now - 150), pid=sleeper.pid)])
    [wrong] = scan_orphan_subproc_pre(now=now)
    [result] = kill_orphans([wrong])
    assert result["action"].startswith("skipped") and sleeper.poll() is None

    from dataclasses import replace

    right = replace(wrong, create_time=ct)
    assert kill_orphans([right], dry_run=True)[0]["action"] == "would terminate"
    [result] = kill_orphans([right], grace_sec=5)
    assert result["action"] == "terminated"
    sleeper.wait(timeout=10)  # psutil already reaped it; the process is gone
    assert not psutil.pid_exists(sleeper.pid) or psutil.Process(sleeper.pid).create_time() != ct


def test_kill_skips_orphans_without_identity() -> None:
    from metal_guard.forensics.orphans import OrphanPre

    assert kill_orphans([OrphanPre("m", 1.0, 100.0, pid=1)])[0]["action"].startswith("skipped")


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_crumb_like = st.one_of(
    st.text(max_size=200),
    st.builds(lambda tag, payload, pid: f"[2026-08-20T10:00:00+00:00] {tag}: {payload} | pid={pid}",
              st.sampled_from(["SUBPROC_PRE", "SUBPROC_POST", "SUBPROCESS_WORKER", "X"]),
              st.text(max_size=30), st.text(max_size=12)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_crumb_like, max_size=40))
def test_fuzz_pairing_never_raises(lines: list[str]) -> None:
    for model, ts, pid, ct in pair_breadcrumbs(lines):
        assert isinstance(model, str) and isinstance(ts, float)
        assert pid is None or isinstance(pid, int)
        assert ct is None or isinstance(ct, float)


def test_ready_line_for_a_model_path_with_spaces_keeps_the_worker_identity() -> None:
    from metal_guard.breadcrumbs import format_line
    from metal_guard.forensics.orphans import pair_breadcrumbs

    lines = [
        format_line("SUBPROCESS_WORKER", "/Users/me/My Models/tiny ready", pid=4242, create_time="123.5"),
        format_line("SUBPROC_PRE", "/Users/me/My Models/tiny", pid=4242),
    ]
    [(model, _ts, pid, create_time)] = pair_breadcrumbs(lines)
    assert (model, pid, create_time) == ("/Users/me/My Models/tiny", 4242, 123.5)
