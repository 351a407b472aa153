"""Issue 11, items 4 and 18: an unreadable safety file is a failed check, never fresh state,
and it is never overwritten. Real EACCES: the checks run as root without CAP_DAC_OVERRIDE /
CAP_DAC_READ_SEARCH (see ``_state_attack``); skipped when not root."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from _state_attack import STATE_FILES, python_no_dac, run_no_dac, user_env

SEED_ALL = """
import json, _state_attack as t
for name, (_file, seed, _op) in t.STATE_FILES.items():
    seed()
print(json.dumps("seeded"))
"""

#: With readable files every op refuses (or, for the ledger, records) as designed.
INTACT = {"breaker": "MLXCooldownActive", "panics": "MLXCooldownActive",
          "cadence": "CadenceViolation", "ledger": "ok", "sentinel": "ok"}

OPS_ALL = """
import json, _state_attack as t
print(json.dumps({name: t.run_op(name) for name in t.STATE_FILES}))
"""


def _snapshot(state: Path) -> dict[str, bytes]:
    return {name: (state / file).read_bytes() for name, (file, _s, _o) in STATE_FILES.items()}


def test_every_unreadable_state_file_fails_its_check_and_survives(tmp_path: Path) -> None:
    base, home = tmp_path, tmp_path / "home"
    home.mkdir(mode=0o700)
    env = user_env(base, home)
    assert python_no_dac(SEED_ALL, env) == "seeded"
    assert python_no_dac(OPS_ALL, env) == INTACT  # the seeded state is in force
    state = home / "state"
    before = _snapshot(state)
    for file, _seed, _op in STATE_FILES.values():
        os.chmod(state / file, 0)

    outcome = python_no_dac(OPS_ALL, env)
    assert outcome == dict.fromkeys(STATE_FILES, "StateFileError")
    for file, _seed, _op in STATE_FILES.values():
        os.chmod(state / file, 0o600)
    assert _snapshot(state) == before  # nothing replaced, nothing quarantined
    assert not list(state.glob("*.corrupt-*"))

    for file, _seed, _op in STATE_FILES.values():
        os.chmod(state / file, 0)
    mg = [sys.executable, "-m", "metal_guard"]
    done = run_no_dac([*mg, "breaker", "check"], env)
    assert done.returncode == 4, (done.returncode, done.stderr)
    assert "breaker.json" in done.stderr and "Permission denied" in done.stderr
    done = run_no_dac([*mg, "panic-gate"], env)
    assert done.returncode == 3, (done.returncode, done.stdout, done.stderr)
    done = run_no_dac([*mg, "--json", "doctor"], env)
    assert "unreadable" in done.stdout
    for file, _seed, _op in STATE_FILES.values():
        os.chmod(state / file, 0o600)
    assert _snapshot(state) == before


def test_an_unreadable_state_dir_is_exit_4_not_70(tmp_path: Path) -> None:
    base, home = tmp_path, tmp_path / "home"
    (home / "state").mkdir(parents=True, mode=0o700)
    os.chmod(home / "state", 0)
    env = user_env(base, home)
    for argv in (["breaker", "check"], ["breaker", "clear"]):
        done = run_no_dac([sys.executable, "-m", "metal_guard", *argv], env)
        assert done.returncode == 4, (argv, done.returncode, done.stderr)
        assert "internal error" not in done.stderr


def test_a_state_file_under_a_file_is_exit_4(tmp_path: Path, metalguard_home: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from metal_guard.cli import main

    (metalguard_home / "state").write_text("not a directory")
    assert main(["breaker", "check"]) == 4
    assert "I/O error" in capsys.readouterr().err
    assert (metalguard_home / "state").read_text() == "not a directory"


LEDGER_LOOKUP = """
import json, logging
from metal_guard.errors import StateFileError
from metal_guard.ledger import lookup_peak, record_peak
logging.basicConfig(level=logging.WARNING)
found = lookup_peak("org/m", mlx_version="v", chip="c")
try:
    record_peak("org/m", 1, quantization="4bit", mlx_version="v", chip="c")
    recorded = "ok"
except StateFileError:
    recorded = "StateFileError"
print(json.dumps([found, recorded]))
"""


def test_an_unreadable_ledger_is_not_used_for_fit_checks_and_not_replaced(
        tmp_path: Path, metalguard_home: Path) -> None:
    from metal_guard.ledger import ledger_path, lookup_peak, record_peak

    record_peak("org/m", 123, quantization="4bit", mlx_version="v", chip="c")
    assert lookup_peak("org/m", mlx_version="v", chip="c")["peak_bytes"] == 123
    path = ledger_path()
    before = path.read_bytes()
    os.chmod(path, 0)
    env = user_env(tmp_path, metalguard_home)
    done = run_no_dac([sys.executable, "-c", LEDGER_LOOKUP], env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [None, "StateFileError"]
    assert "peak ledger unavailable" in done.stderr  # the fit check says it fell back
    os.chmod(path, 0o600)
    assert path.read_bytes() == before
