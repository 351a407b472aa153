from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import filelock
import pytest
from support import wait_for

from metal_guard import storage


def test_write_and_read_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    storage.write_json(path, {"a": 1})
    assert storage.read_json(path, dict) == {"a": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temp files left


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b"\xff\xfe\x00garbage", b'"str"'])
def test_corrupt_file_is_quarantined(tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "breaker.json"
    path.write_bytes(content)
    assert storage.read_json(path, lambda: {"fresh": True}) == {"fresh": True}
    assert not path.exists()
    moved = list(tmp_path.glob("breaker.json.corrupt-*"))
    assert len(moved) == 1 and moved[0].read_bytes() == content
    assert "moved to" in caplog.text


def test_validate_rejects_foreign_json(tmp_path: Path) -> None:
    path = tmp_path / "cadence.json"
    path.write_text(json.dumps({"model": "yesterday"}))
    result = storage.read_json(path, dict, validate=lambda d: all(isinstance(v, float) for v in d.values()))
    assert result == {}
    assert list(tmp_path.glob("cadence.json.corrupt-*"))


def test_update_json_fn_error_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    storage.write_json(path, {"n": 1})

    def boom(state: dict) -> dict:
        state["n"] = 2
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        storage.update_json(path, boom, dict)
    assert storage.read_json(path, dict) == {"n": 1}


def test_jsonl_append_and_tolerant_read(tmp_path: Path) -> None:
    path = tmp_path / "panics.jsonl"
    storage.append_jsonl(path, {"i": 1})
    with path.open("ab") as fh:
        fh.write(b"{truncated\n")
    storage.append_jsonl(path, {"i": 2})
    assert storage.read_jsonl(path) == [{"i": 1}, {"i": 2}]
    assert storage.read_jsonl(tmp_path / "missing.jsonl") == []


def test_jsonl_tail_read(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    for i in range(1000):
        storage.append_jsonl(path, {"i": i}, fsync=False)
    tail = storage.read_jsonl(path, max_bytes=200)
    assert tail and tail[-1] == {"i": 999} and all(isinstance(r, dict) for r in tail)


_INCREMENT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from metal_guard import storage
    path = Path(sys.argv[1])
    def bump(state):
        state["n"] = state.get("n", 0) + 1
    for _ in range(int(sys.argv[2])):
        storage.update_json(path, bump, dict)
    """
)


def test_four_processes_locked_increments(tmp_path: Path) -> None:
    path = tmp_path / "counter.json"
    procs = [
        subprocess.Popen([sys.executable, "-c", _INCREMENT, str(path), "200"]) for _ in range(4)
    ]
    assert [p.wait(timeout=240) for p in procs] == [0, 0, 0, 0]
    assert storage.read_json(path, dict) == {"n": 800}


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from metal_guard import storage
    path = Path(sys.argv[1])
    blob = "x" * 200_000
    i = 0
    print("ready", flush=True)
    while True:
        i += 1
        storage.write_json(path, {"i": i, "blob": blob, "end": i})
    """
)


def test_sigkill_mid_write_leaves_a_complete_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    for round_ in range(5):
        storage.write_json(path, {"i": 0, "blob": "", "end": 0})
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        # this writer has replaced the file at least twice (its counter restarts at 1): it is
        # in its write loop, so the kill below lands mid-loop, not before the first write
        wait_for(lambda: json.loads(path.read_text())["i"] >= 2, interval=0.005,
                 what="the writer's second complete write")
        time.sleep(0.01 * round_)  # then a different moment of the loop each round
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        data = json.loads(path.read_text())  # must parse: old or new, never half
        assert data["i"] == data["end"] >= 2
    leftovers = [p for p in tmp_path.iterdir() if p.name != "state.json"]
    # a killed writer may leave its own temp file behind, never a corrupt target
    assert all(p.name.startswith(".state.json.") for p in leftovers)


def test_remove(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    assert storage.remove(path) is False
    storage.write_json(path, {})
    assert storage.remove(path) is True


def test_locked_is_reentrant_in_a_thread_and_exclusive_across_threads(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "s.json"
    order: list[str] = []
    refused = threading.Event()
    with storage.locked(path, timeout=1), storage.locked(path, timeout=1):  # nested: no deadlock
        order.append("outer")

        def other() -> None:
            try:  # while the outer hold lasts, another thread cannot take the lock ...
                with storage.locked(path, timeout=0):
                    order.append("other-got-it-too")
            except filelock.Timeout:
                order.append("other-refused")
            refused.set()
            with storage.locked(path, timeout=60):  # ... and waits for it
                order.append("other")

        t = threading.Thread(target=other)
        t.start()
        assert refused.wait(60)
        order.append("outer-still-holding")
    t.join(60)
    assert order == ["outer", "other-refused", "outer-still-holding", "other"]
