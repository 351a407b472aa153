"""prefill.py: R4 estimates and refusal, R5 per-request KV tracker."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from metal_guard import prefill
from metal_guard.breadcrumbs import tail
from metal_guard.errors import MetalOOMError
from metal_guard.prefill import KVGrowthTracker, ModelDims

DATA = Path(prefill.__file__).parent / "data" / "model_dims.json"
HERMES = ModelDims(n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128)


def test_known_models_are_data_with_a_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    pos = {"type": "integer", "minimum": 1}
    schema = {"type": "object", "required": ["schema_version", "models"],
              "properties": {"schema_version": {"const": 1}, "models": {"type": "object", "additionalProperties": {
                  "type": "object", "additionalProperties": False,
                  "required": ["n_layers", "n_heads", "n_kv_heads", "head_dim", "dtype_bytes"],
                  "properties": {"n_layers": pos, "n_heads": pos, "n_kv_heads": pos, "head_dim": pos,
                                 "dtype_bytes": {"type": "number", "exclusiveMinimum": 0}}}}}}
    data = json.loads(DATA.read_text())
    jsonschema.validate(data, schema)
    assert len(prefill.KNOWN_MODELS) == len(data["models"]) == 8
    assert prefill.KNOWN_MODELS["Hermes-3-Llama-3.1-8B-4bit"] == HERMES


@pytest.mark.parametrize(
    ("model_id", "key"),
    [
        ("mlx-community/Hermes-3-Llama-3.1-8B-4bit", "Hermes-3-Llama-3.1-8B-4bit"),
        ("mlx-community/hermes-3-llama-3.1-8b-4BIT", "Hermes-3-Llama-3.1-8B-4bit"),
        ("mlx-community/Mistral-Small-3.2-24B-Instruct-2506-4bit", "Mistral-Small-3.2-24B"),
        ("mlx-community/gemma-4-e2b-it-4bit", "gemma-4-e2b-it-4bit"),
    ],
)
def test_lookup_dims(model_id: str, key: str) -> None:
    assert prefill.lookup_dims(model_id) == prefill.KNOWN_MODELS[key]


def test_lookup_dims_unknown_and_local(tiny_model_path: Path) -> None:
    assert prefill.lookup_dims("org/never-heard-of-it") is None
    dims = prefill.lookup_dims(tiny_model_path)
    cfg = json.loads((tiny_model_path / "config.json").read_text())
    assert dims == ModelDims(cfg["num_hidden_layers"], cfg["num_attention_heads"],
                             cfg["num_key_value_heads"], cfg["head_dim"])


def test_runtime_additions_are_honoured() -> None:
    prefill.KNOWN_MODELS["my-private-model"] = ModelDims(2, 2, 2, 2)
    try:
        assert prefill.lookup_dims("me/my-private-model") == ModelDims(2, 2, 2, 2)
    finally:
        del prefill.KNOWN_MODELS["my-private-model"]


def test_dims_from_vlm_config() -> None:
    cfg = {"text_config": {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
                           "hidden_size": 32}}
    assert prefill.dims_from_config(cfg) == ModelDims(2, 4, 1, 8)
    assert prefill.dims_from_config({"hidden_size": 3}) is None


def test_model_dims_validation() -> None:
    with pytest.raises(ValueError):
        ModelDims(0, 1, 1, 1)
    with pytest.raises(ValueError):
        ModelDims(1, 1, 1, 1, dtype_bytes=0)
    assert ModelDims(1, 1, 1, 1, dtype_bytes=0.5).dtype_bytes == 0.5


def test_estimate_formula() -> None:
    ctx = 8192
    scores = 32 * ctx * ctx * 2
    kv = 2 * 32 * 8 * ctx * 128 * 2
    assert prefill.estimate_prefill_peak_alloc_gb(context_tokens=ctx, dims=HERMES) == pytest.approx(max(scores, kv) / 1e9)
    assert prefill.estimate_prefill_peak_alloc_gb(context_tokens=0, dims=HERMES) == 0
    with pytest.raises(ValueError):
        prefill.estimate_prefill_peak_alloc_gb(context_tokens=-1, dims=HERMES)


def test_require_prefill_fit_defensive_and_observer(monkeypatch: pytest.MonkeyPatch) -> None:
    assert prefill.require_prefill_fit(context_tokens=4096, dims=HERMES, available_gb=64) == pytest.approx(1.0737, abs=1e-3)
    with pytest.raises(MetalOOMError, match="single-allocation ceiling") as info:
        prefill.require_prefill_fit(context_tokens=131072, dims=HERMES, available_gb=64)
    assert "prefill_step_size=" in str(info.value)
    with pytest.raises(MetalOOMError, match="available"):
        prefill.require_prefill_fit(context_tokens=8192, dims=HERMES, available_gb=5.0)
    with pytest.raises(ValueError):
        prefill.require_prefill_fit(context_tokens=8, dims=HERMES, available_gb=5.0, headroom_pct=1.0)
    monkeypatch.setenv("METALGUARD_MODE", "observer")
    assert prefill.require_prefill_fit(context_tokens=131072, dims=HERMES, available_gb=64) > 5
    assert any(c.tag == "OBSERVE" for c in tail(5))


def test_recommend_chunk_size() -> None:
    assert prefill.recommend_chunk_size(context_tokens=4096, dims=HERMES) == 4096
    chunk = prefill.recommend_chunk_size(context_tokens=131072, dims=HERMES, single_alloc_ceiling_gb=16.0)
    assert chunk == 1536  # the largest multiple of 512 whose 32 x chunk x 131072 x 2 B block <= 16 GB
    assert 32 * chunk * 131072 * 2 <= 16e9 < 32 * (chunk + 512) * 131072 * 2
    assert prefill.recommend_chunk_size(context_tokens=10**7, dims=HERMES, single_alloc_ceiling_gb=0.001) == 512
    with pytest.raises(ValueError):
        prefill.recommend_chunk_size(context_tokens=8, dims=HERMES, min_chunk=0)


def test_describe_prefill_plan_matches_require() -> None:
    unknown = prefill.describe_prefill_plan(context_tokens=1000, model_id="org/unknown")
    assert unknown["dims_known"] is False and unknown["peak_alloc_gb"] is None and unknown["advisory"]
    for ctx, avail in ((4096, 64.0), (16384, 64.0), (8192, 5.0), (131072, None)):
        plan = prefill.describe_prefill_plan(context_tokens=ctx, dims=HERMES, available_gb=avail)
        try:
            prefill.require_prefill_fit(context_tokens=ctx, dims=HERMES, available_gb=avail)
            refused = False
        except MetalOOMError:
            refused = True
        assert refused == (plan["fits_ceiling"] is False or plan["fits_headroom"] is False), ctx
    named = prefill.describe_prefill_plan(context_tokens=131072, model_id="x/Hermes-3-Llama-3.1-8B-4bit")
    assert named["dims_known"] and named["advisory"]


def test_kv_tracker_lifecycle() -> None:
    t = KVGrowthTracker(ceiling_gb=1.0)
    t.start("r")
    assert t.add_bytes("r", 600_000_000) == 600_000_000
    with pytest.raises(MetalOOMError, match="ceiling"):
        t.add_bytes("r", 600_000_000)
    with pytest.raises(MetalOOMError, match="already exceeded"):
        t.add_bytes("r", 1)
    assert t.add_bytes("ghost", 10**12) == 0
    done = t.finalize("r")
    assert done and done["aborted"] and done["finished"] and done["gb"] == pytest.approx(1.2)
    assert t.finalize("r") is None
    snap = t.snapshot()
    assert snap[-1]["request_id"] == "r" and snap[-1]["running"] is False
    with pytest.raises(ValueError):
        t.start("bad", ceiling_gb=-1)


def test_kv_tracker_observer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_MODE", "observer")
    t = KVGrowthTracker(ceiling_gb=1.0)
    t.start("r")
    assert t.add_bytes("r", 2_000_000_000) == 2_000_000_000
    assert t.add_bytes("r", 1) == 2_000_000_001
    entry = t.finalize("r")
    assert entry and entry["exceeded"] and not entry["aborted"]


def test_kv_tracker_is_thread_safe() -> None:
    t = KVGrowthTracker(ceiling_gb=1000.0)
    t.start("r")

    def add() -> None:
        for _ in range(2000):
            t.add_bytes("r", 3)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert t.finalize("r")["bytes"] == 4 * 2000 * 3


def test_module_singleton() -> None:
    assert isinstance(prefill.kv_tracker, KVGrowthTracker)
