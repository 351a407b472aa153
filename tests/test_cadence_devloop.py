"""The everyday triggers of issue 14 part 1, in real interpreters.

* the dev loop: the same small script, guarded by ``install()``, run twice in a row — the
  second run is not refused (and the load is still recorded, so it was guarded);
* a terminal: a short cadence wait is a visible countdown, then the load proceeds; without a
  terminal the same wait is a ``CadenceViolation`` naming how to relax it;
* ``metal-guard cadence status|reset``.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from metal_guard.cadence import CadenceGuard
from metal_guard.tinymodel import MARKER_NAME

pytest.importorskip("mlx_lm")

SCRIPT = textwrap.dedent("""
    import sys
    import metal_guard
    metal_guard.install()
    import mlx_lm
    model, tok = mlx_lm.load(sys.argv[1])
    text = mlx_lm.generate(model, tok, prompt="hello", max_tokens=3)
    print("OK", len(text))
""")


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALGUARD_")}
    env.update(METALGUARD_HOME=str(home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _run(script: Path, model: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), str(model)], env=env, capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL)


def test_dev_loop_rerun_is_not_refused(tmp_path: Path, metalguard_home: Path, tiny_model_path: Path) -> None:
    script = tmp_path / "devloop.py"
    script.write_text(SCRIPT)
    # the tiny model (marker) and a small model without the marker (sized from its weights)
    plain = tmp_path / "small-model"
    shutil.copytree(tiny_model_path, plain)
    (plain / MARKER_NAME).unlink()
    env = _env(metalguard_home)
    for model, source in ((tiny_model_path, "tiny"), (plain, "tiny")):
        for attempt in range(2):
            proc = _run(script, model, env)
            assert proc.returncode == 0, (attempt, proc.stderr[-2000:])
            assert proc.stdout.startswith("OK"), proc.stdout
            assert "CadenceViolation" not in proc.stderr
        rec = CadenceGuard().records()[str(model)]
        assert rec["interval_sec"] == 0 and rec["interval_source"] == source
        assert "devloop.py" in rec["cmd"]


def _run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, str]:
    """Run ``argv`` with stdin/stdout/stderr on a real pseudo-terminal; (exit code, output)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_terminal_shows_a_countdown_and_loads(tmp_path: Path, metalguard_home: Path,
                                              tiny_model_path: Path) -> None:
    # a session that loads the model, then (re-running a cell) loads it again at once
    script = tmp_path / "reload.py"
    script.write_text(SCRIPT.replace("model, tok = mlx_lm.load(sys.argv[1])",
                                     "mlx_lm.load(sys.argv[1])\n"
                                     "t0 = time.monotonic()\n"
                                     "model, tok = mlx_lm.load(sys.argv[1])\n"
                                     "print('WAITED %.1f' % (time.monotonic() - t0))")
                      .replace("import sys", "import sys, time"))
    env = _env(metalguard_home, METALGUARD_CADENCE_MIN_INTERVAL_SEC="3")
    code, out = _run_in_pty([sys.executable, str(script), str(tiny_model_path)], env)
    assert code == 0, out[-3000:]
    assert "cadence wait" in out and "loading" in out and "OK" in out
    waited = float(out.split("WAITED ", 1)[1].split()[0])
    assert waited >= 2.0  # it really waited (about 3 s) instead of raising
    # the same session without a terminal: refused, with the way out in the message
    proc = _run(script, tiny_model_path, env)
    assert proc.returncode != 0
    assert "CadenceViolation" in proc.stderr and "METALGUARD_CADENCE_MIN_INTERVAL_SEC" in proc.stderr
    assert "metal-guard cadence reset" in proc.stderr


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "metal_guard", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ})


def test_cadence_cli_status_and_reset(metalguard_home: Path) -> None:
    guard = CadenceGuard()
    guard.mark_load("mlx-community/Qwen3-4B-4bit")
    guard.mark_load("some-model-without-a-size")
    proc = _cli("cadence")
    assert proc.returncode == 0, proc.stderr
    assert "mlx-community/Qwen3-4B-4bit" in proc.stdout and f"pid {os.getpid()}" in proc.stdout
    assert "risk-scaled" in proc.stdout and "because" in proc.stdout
    assert "wait" in proc.stdout  # the unknown-size model waits 180 s
    data = json.loads(_cli("cadence", "status", "--json").stdout)
    rows = {r["model"]: r for r in data["entries"]}
    assert rows["some-model-without-a-size"]["interval"]["source"] == "unknown_size"
    assert rows["some-model-without-a-size"]["wait_sec"] > 170
    assert data["min_interval_sec"] is None
    proc = _cli("cadence", "reset", "some-model-without-a-size")
    assert proc.returncode == 0 and "forgot" in proc.stdout
    assert set(CadenceGuard().entries()) == {"mlx-community/Qwen3-4B-4bit"}
    CadenceGuard().check("some-model-without-a-size")  # no longer refused
    assert _cli("cadence", "reset", "not-recorded").returncode == 4
    assert _cli("cadence", "reset").returncode == 64
    assert _cli("cadence", "reset", "x", "--all").returncode == 64
    assert _cli("cadence", "reset", "--all").returncode == 0
    assert CadenceGuard().entries() == {}
    assert "no recent loads" in _cli("cadence").stdout
