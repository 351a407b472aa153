"""Issue 11, items 18 and 19: leftovers and broken lock files.

* A SIGKILL between ``mkstemp`` and ``os.replace`` leaves ``.<name>.<rand>.tmp``: the next
  write sweeps stale temp files of our naming (and only those).
* A ``*.lock`` replaced by a directory (or a symlink) no longer blocks every update forever.
* ``metal-guard lock`` never says "free" when it could not probe the lock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metal_guard import storage

KILL_MID_WRITE = r"""
import os, sys, time
from pathlib import Path
from metal_guard import storage
def stall(src, dst):
    print("tmp-written", flush=True)
    time.sleep(60)
os.replace = stall
storage.write_json(Path(sys.argv[1]), {"v": 2})
"""


def test_a_temp_file_left_by_a_killed_writer_is_swept(metalguard_home: Path) -> None:
    from metal_guard.cadence import CadenceGuard

    guard = CadenceGuard()
    guard.mark_load("m")
    state = guard.path.parent
    proc = subprocess.Popen([sys.executable, "-c", KILL_MID_WRITE, str(guard.path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "tmp-written"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    [leftover] = state.glob(".cadence.json.*.tmp")
    young = state / ".breaker.json.abcd1234.tmp"  # another writer's temp file, in use right now
    young.write_text("{}")
    foreign = state / ".notes.txt.tmp"  # not our naming
    foreign.write_text("keep")
    old = time.time() - storage.STALE_TEMP_SEC - 10
    os.utime(leftover, (old, old))
    os.utime(foreign, (old, old))
    storage._last_sweep.clear()

    guard.mark_load("n")
    assert not leftover.exists()
    assert young.exists() and foreign.read_text() == "keep"
    assert set(guard.entries()) == {"m", "n"}


@pytest.mark.parametrize("kind", ["directory", "symlink"])
def test_a_lock_file_that_is_not_a_file_does_not_block_updates(
        metalguard_home: Path, tmp_path: Path, kind: str) -> None:
    from metal_guard.cadence import CadenceGuard

    guard = CadenceGuard()
    guard.mark_load("m")
    lock = storage.lock_path_for(guard.path)
    lock.unlink()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    if kind == "directory":
        lock.mkdir()
    else:
        lock.symlink_to(victim)  # filelock opens with O_TRUNC: it would empty the target
    guard.mark_load("n")
    assert set(guard.entries()) == {"m", "n"}
    assert victim.read_text() == "precious"
    assert lock.is_file() and not lock.is_symlink()


def test_lock_cli_never_says_free_when_it_could_not_probe(
        metalguard_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from metal_guard.cli import main
    from metal_guard.settings import get_settings

    path = get_settings().resolved_lock_path
    assert main(["lock"]) == 0
    assert "free" in capsys.readouterr().out

    storage.ensure_dir(path.parent)
    path.mkdir()  # probing a directory "succeeds", yet nobody can ever take this lock
    assert main(["lock"]) == 4
    out = capsys.readouterr().out
    assert "free" not in out and "unknown" in out and "is a directory" in out
    assert main(["--json", "lock"]) == 4
    payload = json.loads(capsys.readouterr().out)
    assert payload["held"] is None and "is a directory" in payload["error"]

    from metal_guard.cli.state import doctor_section

    assert doctor_section()["lock"].startswith("unknown:")
