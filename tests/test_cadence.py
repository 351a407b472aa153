"""L9 cadence guard: intervals, gemma-4 floor, GC, bad state, and a real 4-process race."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metal_guard.cadence import (
    CADENCE_GC_AGE_SEC,
    GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC,
    CadenceGuard,
    require_cadence_clear,
)
from metal_guard.errors import CadenceViolation, CrossModelCadenceViolation, SettingsError
from metal_guard.knowledge.families import is_gemma4_family
from metal_guard.settings import get_settings

T0 = 1_800_000_000.0

RACER = r"""
import json, sys, time
from pathlib import Path
from metal_guard.cadence import require_cadence_clear
from metal_guard.errors import CadenceViolation
start = Path(sys.argv[1])
print("READY", flush=True)
while not start.exists():
    time.sleep(0.002)
try:
    require_cadence_clear("m")
    print("WON")
except CadenceViolation as exc:
    print("LOST %.1f" % exc.remaining_sec)
"""


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_defaults_come_from_settings(monkeypatch):
    g = CadenceGuard()
    # unset: risk-scaled per model (an unknown model gets the seed's 180 s)
    assert g.min_interval_sec is None and g.cross_model_interval_sec == 0.0
    assert g.interval_for("m").seconds == 180.0
    assert g.path == get_settings().state_file("cadence.json")
    monkeypatch.setenv("METALGUARD_CADENCE_MIN_INTERVAL_SEC", "30")
    monkeypatch.setenv("METALGUARD_CROSS_MODEL_INTERVAL", "15")
    g = CadenceGuard()
    assert (g.min_interval_sec, g.cross_model_interval_sec) == (30.0, 15.0)
    assert CadenceGuard(min_interval_sec=0).min_interval_sec == 0.0  # code beats env


@pytest.mark.parametrize("raw", ["-5", "abc", "nan"])
def test_bad_env_interval_is_a_settings_error(monkeypatch, raw):
    monkeypatch.setenv("METALGUARD_CADENCE_MIN_INTERVAL_SEC", raw)
    with pytest.raises(SettingsError):
        CadenceGuard()
    with pytest.raises(SettingsError):
        require_cadence_clear("m")


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "10", True])
def test_bad_interval_arguments(bad):
    with pytest.raises(SettingsError):
        CadenceGuard(min_interval_sec=bad)
    with pytest.raises(SettingsError):
        CadenceGuard(cross_model_interval_sec=bad)


def test_same_model_interval_with_injected_clock():
    clock = Clock()
    g = CadenceGuard(min_interval_sec=180, clock=clock)
    g.check("m")
    g.mark_load("m")
    assert g.last_ts("m") == T0
    clock.t += 100
    with pytest.raises(CadenceViolation) as err:
        g.check("m")
    exc = err.value
    assert not isinstance(exc, CrossModelCadenceViolation)
    assert (exc.model_id, exc.last_ts, exc.min_interval, exc.delta) == ("m", T0, 180.0, 100.0)
    assert exc.remaining_sec == 80.0
    assert "retry in 80.0s" in str(exc)
    assert g.seconds_until_clear("m") == pytest.approx(80.0)
    g.check("other")  # cross-model is off by default
    clock.t += 80
    g.check("m")
    assert g.seconds_until_clear("m") == 0.0


def test_cross_model_interval():
    clock = Clock()
    g = CadenceGuard(min_interval_sec=180, cross_model_interval_sec=60, clock=clock)
    g.mark_load("a", ts=T0 - 500)
    g.mark_load("b")
    clock.t += 20
    with pytest.raises(CrossModelCadenceViolation) as err:
        g.check("a")
    exc = err.value
    assert exc.last_model == "b" and exc.cross_model_interval == 60.0 and exc.delta == 20.0
    assert exc.remaining_sec == 40.0 and "retry in 40.0s" in str(exc)
    assert isinstance(exc, CadenceViolation)
    clock.t += 40
    g.check("a")


def test_gemma4_floor_applies_even_with_base_zero():
    clock = Clock()
    g = CadenceGuard(min_interval_sec=180, cross_model_interval_sec=0, clock=clock)
    g.mark_load("mlx-community/Phi-4-mini-instruct-4bit")
    clock.t += 60
    g.check("mlx-community/Qwen3-4B-4bit")  # not gemma-4: no cross-model rule
    with pytest.raises(CrossModelCadenceViolation) as err:
        g.check("mlx-community/gemma-4-26b-a4b-it-4bit")
    assert err.value.cross_model_interval == GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC
    assert err.value.remaining_sec == 30.0
    clock.t += 30
    g.check("mlx-community/gemma-4-26b-a4b-it-4bit")
    # A base above the floor wins.
    g2 = CadenceGuard(g.path, cross_model_interval_sec=120, clock=clock)
    assert g2.effective_cross_model_interval("mlx-community/gemma-4-31b-it-8bit") == 120.0
    assert g.effective_cross_model_interval("mlx-community/gemma-4-31b-it-8bit") == 90.0


@pytest.mark.parametrize(
    ("model_id", "expected"),
    [
        ("mlx-community/gemma-4-31b-it-8bit", True),
        ("mlx-community/gemma-4-26b-a4b-it-4bit", True),
        ("mlx-community/gemma-4-e4b-it-4bit", True),
        ("unsloth/gemma-4-E2B-it", True),
        ("google/gemma-4-31b-it", True),
        ("/Users/me/models/gemma-4-31b-it-8bit/", True),
        ("gemma-4-12b", True),
        ("mlx-community/gemma-4b-it", False),
        ("/models/Gemma_4_12B", True),
        ("mlx-community/gemma-3-4b-it-4bit", False),
        ("mlx-community/Phi-4-mini-instruct-4bit", False),
        ("", False),
    ],
)
def test_gemma4_family_rule(model_id, expected):
    assert is_gemma4_family(model_id) is expected


def test_mark_load_gcs_old_entries():
    clock = Clock()
    g = CadenceGuard(clock=clock)
    g.mark_load("old", ts=T0 - CADENCE_GC_AGE_SEC - 1)
    g.mark_load("recent", ts=T0 - 10)
    g.mark_load("future", ts=T0 + 10_000)  # a clock jump or a hand edit
    g.mark_load("new")
    assert set(g.entries()) == {"recent", "new"}


def test_gc_keeps_entries_a_long_interval_still_needs():
    clock = Clock()
    g = CadenceGuard(min_interval_sec=6 * 3600, clock=clock)
    g.mark_load("m", ts=T0 - 5 * 3600)
    g.mark_load("x")
    assert "m" in g.entries()
    with pytest.raises(CadenceViolation):
        g.check("m")


def test_require_cadence_clear_is_check_then_mark():
    clock = Clock()
    g = CadenceGuard(clock=clock)
    assert require_cadence_clear("m", guard=g) == T0
    assert g.last_ts("m") == T0
    clock.t += 10
    with pytest.raises(CadenceViolation):
        require_cadence_clear("m", guard=g)
    assert g.last_ts("m") == T0  # a refused load records nothing
    require_cadence_clear("m", guard=g, min_interval_sec=5)  # explicit beats the guard's 180
    assert g.last_ts("m") == T0 + 10
    assert require_cadence_clear("n", now=T0 + 11, guard=g) == T0 + 11


def test_reset():
    g = CadenceGuard()
    g.mark_load("a")
    g.mark_load("b")
    g.reset("a")
    assert set(g.entries()) == {"b"}
    g.reset()
    assert g.entries() == {}


def test_empty_model_id_is_rejected():
    with pytest.raises(ValueError):
        CadenceGuard().check("  ")


@pytest.mark.parametrize(
    "content",
    ["", "{trunc", "[1, 2]", '"text"', '{"m": "yesterday"}', '{"m": true}', b"\xff\xfe"],
)
def test_corrupt_or_foreign_state_is_quarantined(content, caplog):
    g = CadenceGuard()
    g.path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        g.path.write_bytes(content)
    else:
        g.path.write_text(content)
    with caplog.at_level("WARNING", logger="metal_guard.storage"):
        g.check("m")  # fresh state: passes, no crash
    assert len([r for r in caplog.records if "quarantine" in r.getMessage() or "moved to" in r.getMessage()]) == 1
    assert list(g.path.parent.glob("cadence.json.corrupt-*"))
    g.mark_load("m")
    assert json.loads(g.path.read_text())["m"]["ts"] == pytest.approx(time.time(), abs=60)


def test_file_records_who_loaded_and_reads_the_seed_format():
    g = CadenceGuard()
    g.mark_load("mlx-community/x", ts=T0)
    rec = json.loads(Path(g.path).read_text())["mlx-community/x"]
    assert rec["ts"] == T0 and rec["pid"] == os.getpid() and rec["cmd"]
    # the seed's {model: epoch} is still read
    g.path.write_text(json.dumps({"mlx-community/y": T0}))
    assert g.entries() == {"mlx-community/y": T0}
    assert g.records() == {"mlx-community/y": {"ts": T0}}


def test_four_processes_racing_exactly_one_wins(tmp_path):
    start = tmp_path / "go"
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, str(start)], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    for r in racers:  # every racer is up and polling before the start signal
        assert r.stdout is not None and r.stdout.readline().strip() == "READY"
    start.touch()
    results = [r.communicate(timeout=60)[0].strip() for r in racers]
    assert all(r.returncode == 0 for r in racers)
    assert sorted(x.split()[0] for x in results) == ["LOST", "LOST", "LOST", "WON"], results
    assert set(CadenceGuard().entries()) == {"m"}
