"""The L8 lock's answers are frozen records, and `metal-guard lock/status --json` keep their keys.

Real child processes hold the real lock; sidecars are edited on disk like a hostile writer would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from metal_guard import lock as lockmod
from metal_guard.cli import main
from metal_guard.errors import MLXLockConflict
from metal_guard.lock import (
    LockHolder,
    LockNotAcquired,
    acquire_mlx_lock,
    lock_sidecar_path,
    mlx_exclusive_lock,
    read_mlx_lock,
    release_mlx_lock,
)

pytestmark = pytest.mark.usefixtures("drop_lock_holds")

HOLDER = r"""
import sys
from metal_guard.lock import acquire_mlx_lock
acquire_mlx_lock("child-holder")
print("READY", flush=True)
sys.stdin.readline()
"""

#: The keys `metal-guard lock --json` printed for each kind of holder before the records
#: (pinned: scripts and dashboards read them).
SIDECAR_KEYS = {"pid", "create_time", "label", "cmdline", "started_at", "host", "lock_path"}
VERIFIED_KEYS = SIDECAR_KEYS | {"held", "verified", "held_by_this_process", "elapsed_s"}
OWN_KEYS = VERIFIED_KEYS | {"acquired", "depth"}
UNVERIFIED_KEYS = {"held", "verified", "held_by_this_process", "pid", "label", "reason",
                   "claimed", "lock_path"}




@pytest.fixture
def child_holder() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        raise AssertionError(f"holder failed: {line!r} {proc.stderr.read()}")
    yield proc
    proc.kill()
    proc.wait(10)


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def edit_sidecar(**changes: Any) -> None:
    path = lock_sidecar_path()
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------- the CLI's JSON


def test_lock_and_status_json_keys_for_a_free_lock(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_json(capsys, "lock") == (0, {"held": False, "holder": None})
    assert cli_json(capsys, "status")[1]["lock"] == {"held": False}


def test_lock_and_status_json_keys_for_this_process(capsys: pytest.CaptureFixture[str]) -> None:
    acquire_mlx_lock("mine")
    code, out = cli_json(capsys, "lock")
    assert code == 0 and set(out) == {"held", "holder"} and out["held"] is True
    holder = out["holder"]
    assert set(holder) == OWN_KEYS
    assert (holder["pid"], holder["label"], holder["depth"]) == (os.getpid(), "mine", 1)
    assert holder["acquired"] is holder["verified"] is holder["held_by_this_process"] is True
    assert holder["lock_path"] == str(lockmod.get_settings().resolved_lock_path)
    status_lock = cli_json(capsys, "status")[1]["lock"]
    assert set(status_lock) == OWN_KEYS and status_lock["pid"] == os.getpid()


def test_lock_and_status_json_keys_for_a_verified_holder(
        child_holder: subprocess.Popen[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out = cli_json(capsys, "lock")
    holder = out["holder"]
    assert code == 0 and out["held"] is True and set(holder) == VERIFIED_KEYS
    assert holder["pid"] == child_holder.pid and holder["label"] == "child-holder"
    assert holder["verified"] is True and holder["held_by_this_process"] is False
    assert isinstance(holder["create_time"], float) and isinstance(holder["elapsed_s"], float)
    status_lock = cli_json(capsys, "status")[1]["lock"]
    assert set(status_lock) == VERIFIED_KEYS and status_lock["pid"] == child_holder.pid


def test_lock_and_status_json_keys_for_an_unverified_holder(
        child_holder: subprocess.Popen[str], capsys: pytest.CaptureFixture[str]) -> None:
    edit_sidecar(create_time=1.0, label="forged")
    code, out = cli_json(capsys, "lock")
    holder = out["holder"]
    assert code == 0 and out["held"] is True and set(holder) == UNVERIFIED_KEYS
    assert holder["pid"] is None and holder["label"] is None and holder["verified"] is False
    assert "started at another time" in holder["reason"]
    assert holder["claimed"]["label"] == "forged" and holder["claimed"]["pid"] == child_holder.pid
    status_lock = cli_json(capsys, "status")[1]["lock"]
    assert set(status_lock) == UNVERIFIED_KEYS and status_lock["claimed"]["label"] == "forged"


def test_doctor_json_lock_holder_keys(child_holder: subprocess.Popen[str],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    holder = cli_json(capsys, "doctor")[1]["state"]["lock_holder"]
    assert set(holder) == VERIFIED_KEYS and holder["pid"] == child_holder.pid


# --------------------------------------------------------------------------- the records


def test_acquire_returns_a_frozen_holder_record_with_the_mapping_view() -> None:
    info = acquire_mlx_lock("record")
    try:
        assert isinstance(info, LockHolder)
        assert info.acquired and info.depth == 1 and info.pid == os.getpid()
        assert info["pid"] == info.pid and info.get("depth") == 1 and "reason" not in info
        assert set(info) == OWN_KEYS and dict(info) == info.as_dict()
        with pytest.raises(dataclasses.FrozenInstanceError):
            info.pid = 1  # type: ignore[misc]
        with pytest.raises(TypeError):
            info["pid"] = 1  # type: ignore[index]
        seen = read_mlx_lock()
        assert isinstance(seen, LockHolder) and seen.held_by_this_process
        json.dumps(info.as_dict())  # plain data
    finally:
        release_mlx_lock()


def test_a_conflict_carries_a_holder_record(child_holder: subprocess.Popen[str]) -> None:
    with pytest.raises(MLXLockConflict) as err:
        acquire_mlx_lock("second")
    holder = err.value.holder
    assert isinstance(holder, LockHolder)
    assert holder.pid == child_holder.pid and holder.verified and not holder.acquired
    assert holder["label"] == "child-holder" and "acquired" not in holder


def test_observer_mode_yields_a_not_acquired_record(child_holder: subprocess.Popen[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_MODE", "observer")
    with mlx_exclusive_lock("watcher") as info:
        assert isinstance(info, LockNotAcquired)
        assert info.acquired is False and info.observer is True and info.job_shared is None
        assert isinstance(info.holder, LockHolder) and info.holder.pid == child_holder.pid
        assert set(info) == {"acquired", "observer", "label", "lock_path", "holder"}
        out = info.as_dict()
        assert out["holder"]["pid"] == child_holder.pid and set(out["holder"]) == VERIFIED_KEYS
        json.dumps(out)
    assert read_mlx_lock() is not None  # the holder was not disturbed


def test_a_verified_sidecar_contributes_only_its_own_fields(
        child_holder: subprocess.Popen[str]) -> None:
    """A live holder's sidecar with extra keys and status keys of its own: the record keeps
    the sidecar's fields (typed, capped) and decides ``verified``/``reason`` itself."""
    edit_sidecar(label="x" * 5000, host=["not", "text"], reason="trust me", acquired=True,
                 depth=99, force_refused="no", verified=False, extra={"a": 1},
                 reclaimed_from={"pid": 7, "label": "old", "started_at": "t", "junk": "y" * 99})
    seen = read_mlx_lock()
    assert seen is not None and seen.verified and seen.pid == child_holder.pid
    assert seen.label == "x" * 200 and seen.host is None
    assert seen.reason is None and not seen.acquired and seen.depth is None
    assert seen.force_refused is None and "extra" not in seen
    assert seen.reclaimed_from == {"pid": 7, "label": "old", "started_at": "t"}
    assert set(seen) == VERIFIED_KEYS | {"reclaimed_from"}


def test_from_mapping_keeps_known_fields_of_the_right_type() -> None:
    h = LockHolder.from_mapping({"pid": True, "create_time": 3, "label": 5, "verified": "yes",
                                 "claimed": {"pid": 1}, "cmdline": "c" * 900, "unknown": 1})
    assert h.pid is None and h.create_time == 3.0 and h.label is None
    assert h.verified is False and h.claimed == {"pid": 1} and len(h.cmdline or "") == 500
    assert "unknown" not in h.as_dict()


def test_conflict_built_from_an_0x_holder_dict() -> None:
    exc = MLXLockConflict({"pid": 42, "label": "bench", "verified": True})
    assert isinstance(exc.holder, LockHolder) and exc.holder.pid == 42
    assert str(exc) == "MLX lock is held by pid 42 (bench)"
    assert str(MLXLockConflict(None)) == "MLX lock is held by an unidentified process"


def test_job_shared_rank_gets_a_not_acquired_record(tmp_path: Path) -> None:
    rank0 = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom metal_guard.lock import acquire_mlx_lock\n"
         "acquire_mlx_lock('rank 0', job='ring:j')\nprint('READY', flush=True)\n"
         "sys.stdin.readline()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert rank0.stdout is not None and rank0.stdout.readline().strip() == "READY"
        info = acquire_mlx_lock("rank 1", job="ring:j")
        assert isinstance(info, LockNotAcquired) and info.job_shared and info.job == "ring:j"
        assert info.holder.pid == rank0.pid and info.holder.job == "ring:j"
        assert set(info) == {"acquired", "job_shared", "job", "label", "lock_path", "holder"}
        assert info.as_dict()["holder"]["job"] == "ring:j"
    finally:
        rank0.kill()
        rank0.wait(10)
