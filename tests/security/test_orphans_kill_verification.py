"""Issue 11, item 2 (the kill side) and issue 13: ``kill_orphans`` signals only a process that is
verifiably a metal-guard worker of this user for the orphan's model — never a pid because a
log line names it — and the seed's ``ready, pid=N`` line still lends its pid to a later PRE."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from _state_attack import other_user
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import argv_visible, at, sleeping_child, wait_for, write_crumbs

from metal_guard.breadcrumbs import format_line
from metal_guard.forensics.orphans import (
    OrphanPre,
    kill_orphans,
    pair_breadcrumbs,
    scan_orphan_subproc_pre,
    worker_identity_problem,
)


def _write(lines: list[str]) -> None:
    write_crumbs(lines, append=False)


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    with sleeping_child() as proc:
        yield proc


def _orphan(proc_pid: int, model: str = "m") -> OrphanPre:
    ct = psutil.Process(proc_pid).create_time()
    return OrphanPre(model, time.time() - 500, 500.0, proc_pid, ct, "running")


line_forms = st.sampled_from(["modern", "legacy-ready", "pre-only", "post-other-model"])


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(form=line_forms, model=st.text(min_size=1, max_size=30), ct_off=st.sampled_from([0.0, 0.001]))
@example(form="legacy-ready", model=" ", ct_off=0.0)  # a blank name paired as "" vs "?" once
def test_no_breadcrumb_makes_kill_signal_a_process_that_is_not_a_worker(
        bystander: subprocess.Popen[bytes], form: str, model: str, ct_off: float) -> None:
    pid = bystander.pid
    ct = psutil.Process(pid).create_time() + ct_off  # the exact identity of a real process
    now = time.time()
    lines = {
        "modern": [format_line("SUBPROCESS_WORKER", f"{model} ready", now=at(now - 20), pid=pid,
                               create_time=f"{ct:.3f}"),
                   format_line("SUBPROC_PRE", model, now=at(now - 10), pid=pid)],
        "legacy-ready": [format_line("SUBPROCESS_WORKER", f"{model} ready", now=at(now - 20),
                                     pid=pid, create_time=f"{ct:.3f}"),
                         format_line("SUBPROC_PRE", model, now=at(now - 10))],
        "pre-only": [format_line("SUBPROC_PRE", model, now=at(now - 10), pid=pid,
                                 create_time=f"{ct:.3f}")],
        "post-other-model": [format_line("SUBPROC_PRE", model, now=at(now - 10), pid=pid,
                                         create_time=f"{ct:.3f}"),
                             format_line("SUBPROC_POST", model + "x", now=at(now - 5), pid=pid)],
    }[form]
    _write(lines)
    orphans = scan_orphan_subproc_pre(threshold_sec=0, now=now)
    assert [o.pid for o in orphans] == [pid]  # the claim is read ...
    results = kill_orphans(orphans, grace_sec=0.5)
    assert results[0]["action"].startswith("skipped")  # ... but never acted on
    assert bystander.poll() is None


def test_another_users_worker_lookalike_is_never_signalled() -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv not available")
    with other_user() as user:
        proc = subprocess.Popen([setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                                 "--clear-groups", "/bin/sh", "-c", "sleep 300; :", "-m",
                                 "metal_guard.isolation.worker", "--config", '{"model_id": "m"}'],
                                start_new_session=True)  # its own group: sh and its sleep
        try:
            wait_for(lambda: psutil.Process(proc.pid).uids().real == user.pw_uid,
                     interval=0.02, what="setpriv to switch to the other user")
            argv_visible(proc)
            [result] = kill_orphans([_orphan(proc.pid)], grace_sec=0.5)
            assert result["action"] == f"skipped: process runs as uid {user.pw_uid}, not as this user"
            assert proc.poll() is None
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the group we started, so the user can go
            proc.wait(timeout=10)


def test_a_worker_of_another_model_is_not_signalled() -> None:
    with sleeping_child(300, ["-m", "metal_guard.isolation.worker", "--config",
                              '{"model_id": "other"}']) as proc:
        [result] = kill_orphans([_orphan(argv_visible(proc).pid, "m")], grace_sec=0.5)
        assert result["action"] == "skipped: a metal-guard worker of another model"
        assert proc.poll() is None


def test_a_real_hung_worker_is_verified_and_killed(tiny_model_path: Path) -> None:
    from metal_guard.isolation import MLXSubprocessRunner

    runner = MLXSubprocessRunner(tiny_model_path)
    try:
        runner.generate("hello", max_tokens=2)
        pid = runner.worker_pid
        assert pid is not None
        proc = psutil.Process(pid)
        assert worker_identity_problem(proc, str(tiny_model_path), proc.create_time()) is None
        now = time.time()
        # what a generation that never returned leaves in the log
        _write([format_line("SUBPROC_PRE", str(tiny_model_path), now=at(now - 300), pid=pid,
                            create_time=f"{proc.create_time():.3f}")])
        [orphan] = scan_orphan_subproc_pre(now=now)
        assert orphan.status == "running"
        assert kill_orphans([replace(orphan)], dry_run=True)[0]["action"] == "would terminate"
        [result] = kill_orphans([orphan], grace_sec=5)
        assert result["action"] in ("terminated", "killed")
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        runner.shutdown()


def test_seed_ready_line_lends_its_pid_to_a_later_pre() -> None:
    t = 1_787_000_000.0
    lines = [
        "[2026-08-17 20:00:00] SUBPROCESS_WORKER: model-x ready, pid=4242",  # the seed's form
        format_line("SUBPROC_PRE", "model-x", now=at(t)),  # names no pid
        format_line("SUBPROCESS_WORKER", "model-y ready", now=at(t), pid=5151, create_time="12.5"),
        format_line("SUBPROC_PRE", "model-y", now=at(t + 1)),
    ]
    assert [(m, pid, ct) for m, _ts, pid, ct in pair_breadcrumbs(lines)] == [
        ("model-x", 4242, None), ("model-y", 5151, 12.5)]
    # no create_time recorded for the seed's worker: reported, never killed
    [result] = kill_orphans([OrphanPre("model-x", t, 1.0, 4242, None, "running")])
    assert result["action"] == "skipped: no recorded pid/create_time to verify"
