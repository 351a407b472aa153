"""Risk-scaled cadence: the interval from size vs. working set, floors, the explicit override,
refusal messages, rank-aware entries and the interactive countdown."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from metal_guard import cadence_risk
from metal_guard.cadence import CadenceGuard, require_cadence_clear
from metal_guard.cadence_risk import cadence_rules, risk_interval, validate_rules
from metal_guard.cadence_wait import clear_or_wait
from metal_guard.distributed import RankInfo
from metal_guard.errors import CadenceViolation, CrossModelCadenceViolation
from metal_guard.settings import get_settings

T0 = 1_800_000_000.0
GB = 1_000_000_000
FIXTURES = Path(__file__).parent / "fixtures" / "macos"
M4_PRO_48 = json.loads((FIXTURES / "device_info.json").read_text())["m4_pro_48"]
WS_48 = M4_PRO_48["max_recommended_working_set_size"]  # 40.2 GB
M4_MAX_128 = json.loads((FIXTURES / "device_info.json").read_text())["m4_max_128"]
WS_128 = M4_MAX_128["max_recommended_working_set_size"]  # 115.4 GB


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, sec: float) -> None:
        self.t += sec


def fake_model(root: Path, name: str, size_bytes: int) -> Path:
    """A local model directory whose (sparse) safetensors file has ``size_bytes``."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with open(d / "model.safetensors", "wb") as fh:
        fh.truncate(size_bytes)
    return d


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(("ratio", "expected"), [(0.01, 0), (0.099, 0), (0.101, 30), (0.2, 30),
                                                 (0.251, 90), (0.49, 90), (0.501, 180), (0.9, 180),
                                                 (1.5, 180)])
def test_interval_grows_with_size_relative_to_the_working_set(ratio, expected):
    got = risk_interval("org/some-model", size_bytes=int(ratio * WS_48), budget_bytes=WS_48)
    assert got.seconds == expected and got.source == "size"
    assert f"{ratio:.0%}" in got.reason and "GPU working set" in got.reason


def test_the_seeds_case_and_a_dev_loop_case_from_real_sizes(tmp_path):
    # the seed's evidence: a ~34 GB gemma-4 31B 8-bit on a 64 GB Mac Studio (~48 GB working set)
    big = fake_model(tmp_path, "big-31b-8bit", 34 * GB)
    assert risk_interval(str(big), budget_bytes=48 * GB).seconds == 180
    # a 1B 4-bit (~0.7 GB) reloaded on the same machine: no wait
    small = fake_model(tmp_path, "llama-1b-4bit", 700_000_000)
    got = risk_interval(str(small), budget_bytes=48 * GB)
    assert got.seconds == 0 and got.size_source == "safetensors"
    # the same 8B 4-bit (4.5 GB) is nothing on 128 GB but 39 % of a 16 GB Mac's 11.5 GB
    assert risk_interval("mlx-community/Llama-3.1-8B-Instruct-4bit", budget_bytes=WS_128).seconds == 0
    assert risk_interval("mlx-community/Llama-3.1-8B-Instruct-4bit", budget_bytes=11_453_251_584).seconds == 90


def test_tiny_models_never_wait(tiny_model_path, tmp_path):
    got = risk_interval(str(tiny_model_path))
    assert got.seconds == 0 and got.source == "tiny"
    # by size too: any model under 100 MB, even on a tiny budget
    little = fake_model(tmp_path, "little", 50_000_000)
    got = risk_interval(str(little), budget_bytes=60_000_000)
    assert got.seconds == 0 and got.source == "tiny"


def test_unknown_size_gets_the_seeds_conservative_interval():
    got = risk_interval("some-model-without-a-size")
    assert got.seconds == 180 and got.source == "unknown_size" and "could not be determined" in got.reason


def test_registry_floor_and_gemma4_floor():
    # the panic-tier 31B gemma-4 is under half of an M4 Max's working set, but its floor is 180 s
    got = risk_interval("mlx-community/gemma-4-31b-it-8bit", budget_bytes=WS_128)
    assert got.ratio is not None and got.ratio < 0.5
    assert got.seconds == 180 and got.source == "registry" and "panic-tier" in got.reason
    # a small gemma-4 keeps the family's 90 s
    got = risk_interval("mlx-community/gemma-4-26b-a4b-it-4bit", budget_bytes=WS_128)
    assert got.ratio is not None and got.ratio < 0.25
    assert got.seconds == 90 and got.source == "gemma4_floor" and "gemma-4" in got.reason
    # a non-gemma model of the same size does not
    assert risk_interval("mlx-community/Qwen3-4B-4bit", budget_bytes=WS_128).seconds == 0


def test_explicit_setting_overrides_in_both_directions(monkeypatch, tiny_model_path):
    monkeypatch.setenv("METALGUARD_CADENCE_MIN_INTERVAL_SEC", "0")
    g = CadenceGuard()
    got = g.interval_for("mlx-community/gemma-4-31b-it-8bit")
    assert got.seconds == 0 and got.source == "setting"
    assert "METALGUARD_CADENCE_MIN_INTERVAL_SEC" in got.reason
    monkeypatch.setenv("METALGUARD_CADENCE_MIN_INTERVAL_SEC", "600")
    assert CadenceGuard().interval_for(str(tiny_model_path)).seconds == 600
    assert CadenceGuard(min_interval_sec=5).interval_for(str(tiny_model_path)).seconds == 5


def test_gpu_budget_is_known_on_this_machine():
    budget, source = cadence_risk.gpu_budget()
    assert isinstance(budget, int) and budget > 0 and source != "unknown"


def test_packaged_rules_are_valid_and_bad_tables_are_rejected():
    rules = cadence_rules()
    validate_rules(rules)
    assert rules["gemma4_same_model_floor_sec"] == 90
    assert rules["size_bands"][-1]["interval_sec"] == 180  # the seed's value for big models
    for bad in (
        {**rules, "size_bands": []},
        {**rules, "size_bands": [{"max_ratio": 0.5, "interval_sec": 10}]},
        {**rules, "size_bands": [{"max_ratio": 0.5, "interval_sec": 100}, {"max_ratio": None, "interval_sec": 10}]},
        {**rules, "size_bands": [{"max_ratio": 0.5, "interval_sec": 1}, {"max_ratio": 0.2, "interval_sec": 2},
                                 {"max_ratio": None, "interval_sec": 3}]},
        {**rules, "tiny_model_max_bytes": -1},
        {**rules, "registry_tier_floors_sec": {"panic": "long"}},
        {**rules, "schema_version": 2},
    ):
        with pytest.raises(ValueError):
            validate_rules(bad)


# --------------------------------------------------------------------------- refusals


def test_refusal_says_when_why_by_whom_and_how_to_relax():
    clock = Clock()
    g = CadenceGuard(clock=clock)
    model = "mlx-community/gemma-4-31b-it-8bit"
    g.require_clear(model)
    clock.t += 12
    with pytest.raises(CadenceViolation) as err:
        g.require_clear(model)
    exc = err.value
    text = str(exc)
    assert exc.remaining_sec == 168.0 and exc.last_pid == os.getpid()
    assert f"by pid {os.getpid()}" in text and "12.0s ago" in text
    assert exc.reason and f"because {exc.reason}" in text  # why (size or registry floor)
    assert "GPU working set" in exc.reason or "panic-tier" in exc.reason
    assert "Retry at 08:03:00 UTC" in text and "retry in 168.0s" in text  # when
    assert "METALGUARD_CADENCE_MIN_INTERVAL_SEC" in text  # how to relax
    assert f"metal-guard cadence reset {model}" in text


def test_refusal_with_an_explicit_setting_says_to_lower_it(monkeypatch):
    monkeypatch.setenv("METALGUARD_CADENCE_MIN_INTERVAL_SEC", "60")
    clock = Clock()
    g = CadenceGuard(clock=clock)
    g.require_clear("m")
    clock.t += 1
    with pytest.raises(CadenceViolation, match="lower METALGUARD_CADENCE_MIN_INTERVAL_SEC"):
        g.require_clear("m")


def test_cross_model_refusal_names_the_gemma4_floor_and_the_other_model():
    clock = Clock()
    g = CadenceGuard(clock=clock)
    g.require_clear("mlx-community/Qwen3-4B-4bit")
    clock.t += 10
    with pytest.raises(CrossModelCadenceViolation) as err:
        g.require_clear("mlx-community/gemma-4-e4b-it-4bit")
    text = str(err.value)
    assert "gemma-4 family" in text and "Qwen3-4B-4bit" in text and "retry in 80.0s" in text
    assert "metal-guard cadence reset mlx-community/Qwen3-4B-4bit" in text


def test_hostile_state_values_are_cleaned_before_they_reach_a_message():
    g = CadenceGuard()
    g.path.parent.mkdir(parents=True, exist_ok=True)
    import time

    g.path.write_text(json.dumps({"m": {"ts": time.time(), "pid": -5, "cmd": "evil\x1b[2J\nline" * 50,
                                        "ranks": ["x", 1, True], "job": 7}}))
    rec = g.records()["m"]
    assert "pid" not in rec and "job" not in rec and rec["ranks"] == [1]
    assert len(rec["cmd"]) <= 120 and "\x1b" not in rec["cmd"] and "\n" not in rec["cmd"]
    with pytest.raises(CadenceViolation) as err:
        g.check("m")
    assert "\x1b" not in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- distributed ranks


def _rank(rank: int, job: str = "ring:abc", world: int = 2) -> RankInfo:
    return RankInfo(rank, world, "ring", job, "topology")


def test_ranks_of_one_job_are_one_logical_load():
    clock = Clock()
    g = CadenceGuard(min_interval_sec=180, clock=clock)
    first = g.require_clear("m", rank=_rank(0))
    clock.t += 0.5
    assert g.require_clear("m", rank=_rank(1)) == first  # joins, keeps the first time
    rec = g.records()["m"]
    assert rec["ranks"] == [0, 1] and rec["job"] == "ring:abc" and rec["world_size"] == 2
    # a rank loading the model again (or the next run of the same command) is a new load
    with pytest.raises(CadenceViolation, match="rank"):
        g.require_clear("m", rank=_rank(0))
    # another job, or a plain process, is refused as before
    with pytest.raises(CadenceViolation):
        g.require_clear("m", rank=_rank(1, job="ring:other"))
    with pytest.raises(CadenceViolation):
        g.require_clear("m")


def test_a_jobs_ranks_do_not_trip_the_cross_model_rule_on_each_other():
    clock = Clock()
    g = CadenceGuard(min_interval_sec=0, cross_model_interval_sec=60, clock=clock)
    g.require_clear("shard-a", rank=_rank(0))
    g.require_clear("shard-b", rank=_rank(1))  # rank 1 has not loaded shard-a: same job
    with pytest.raises(CrossModelCadenceViolation):
        g.require_clear("shard-b", rank=_rank(0, job="ring:other"))


# --------------------------------------------------------------------------- interactive wait


def test_interactive_session_waits_out_a_short_refusal_with_a_countdown(monkeypatch):
    monkeypatch.setenv("METALGUARD_CADENCE_MIN_INTERVAL_SEC", "20")
    clock = Clock()
    out = io.StringIO()
    clear_or_wait("m", interactive=True, stream=out, sleep=clock.sleep, now=clock)
    clock.t += 5
    recorded = clear_or_wait("m", interactive=True, stream=out, sleep=clock.sleep, now=clock)
    assert recorded == T0 + 20 and clock.t == T0 + 20  # waited exactly the remaining 15 s
    text = out.getvalue()
    assert "cadence wait 15s" in text and " 15s" in text and "  1s" in text and "now" in text
    assert CadenceGuard().records()["m"]["ts"] == T0 + 20


def test_no_countdown_without_a_person_or_for_a_long_wait(monkeypatch):
    monkeypatch.setenv("METALGUARD_CADENCE_MIN_INTERVAL_SEC", "20")
    clock = Clock()
    clear_or_wait("m", interactive=False, now=clock)
    with pytest.raises(CadenceViolation):
        clear_or_wait("m", interactive=False, now=clock, sleep=clock.sleep)
    assert clock.t == T0
    monkeypatch.setenv("METALGUARD_CADENCE_INTERACTIVE_WAIT_SEC", "10")
    with pytest.raises(CadenceViolation):  # 20 s is longer than the 10 s an interactive user waits
        clear_or_wait("m", interactive=True, now=clock, sleep=clock.sleep, stream=io.StringIO())
    assert clock.t == T0
    with pytest.raises(CadenceViolation):  # observer mode records, it never waits
        clear_or_wait("m", settings=get_settings(mode="observer"), interactive=True, now=clock,
                      sleep=clock.sleep, stream=io.StringIO())


def test_require_cadence_clear_passes_rank_and_path(tiny_model_path):
    clock = Clock()
    g = CadenceGuard(clock=clock)
    # the model id is a hub-style name, the size comes from the local path: tiny, never waits
    require_cadence_clear("org/tiny", guard=g, model_path=str(tiny_model_path))
    require_cadence_clear("org/tiny", guard=g, model_path=str(tiny_model_path))
    assert g.records()["org/tiny"]["interval_source"] == "tiny"
