"""The known-panic registry: shipped data, schema, vocabulary, matching, warnings and policy."""

from __future__ import annotations

import copy
import json
import logging
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from metal_guard.classify import ERROR_CLASS_NAMES, error_classes
from metal_guard.errors import KnownPanicModelError
from metal_guard.knowledge import registry, validate
from metal_guard.knowledge.registry import (
    KNOWN_PANIC_MODELS,
    WORKLOAD_ADVISORIES,
    check_known_panic_model,
    check_known_panic_model_for_gpu,
    check_workload_advisory,
    enforce_known_panic_policy,
    models_affecting_gpu_family,
    models_by_tier,
    normalize_gpu_family,
    resolve_model_ref,
    warn_if_known_panic_model,
)
from metal_guard.settings import get_settings

GEMMA = "mlx-community/gemma-4-31b-it-8bit"
LOGGER = "metal_guard.knowledge.registry"


def _doc(name: str) -> Any:
    return json.loads(resources.files("metal_guard").joinpath("data", name).read_text("utf-8"))


@pytest.fixture(autouse=True)
def _fresh_warnings() -> None:
    registry._reset_warnings()


# --------------------------------------------------------------------------- data + schema


def test_shipped_registry_passes_jsonschema_and_builtin_validator() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = _doc("registry_schema.json")
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(_doc("panic_registry.json"), schema, cls=jsonschema.Draft202012Validator)
    assert validate.validate_registry(_doc("panic_registry.json")) == []


def test_schema_uses_only_keywords_the_builtin_validator_knows() -> None:
    def keys(node: Any) -> set[str]:
        if isinstance(node, dict):
            found = set(node)
            for key, value in node.items():
                if key in ("properties", "$defs"):
                    for sub in value.values():
                        found |= keys(sub)
                elif key in ("items", "additionalProperties", "propertyNames") and isinstance(value, dict):
                    found |= keys(value)
            return found
        return set()

    for name in ("registry_schema.json", "advisories_schema.json"):
        assert keys(_doc(name)) <= validate.SUPPORTED_KEYWORDS, name


def test_one_vocabulary_every_error_class_type_is_a_classifier_name() -> None:
    doc = _doc("panic_registry.json")
    used = {o["type"] for e in doc["models"].values() for o in e["error_classes"]}
    used |= {w["error_class"] for w in doc["workloads"].values() if w["error_class"]}
    assert used, "the registry should reference classifier classes"
    assert used <= ERROR_CLASS_NAMES, used - ERROR_CLASS_NAMES


def test_tiers_follow_the_error_class_kinds() -> None:
    kinds = {c.name: c.kind for c in error_classes()}
    for key, entry in _doc("panic_registry.json")["models"].items():
        has_panic = any(kinds[o["type"]] == "kernel_panic" for o in entry["error_classes"])
        assert (entry["tier"] == "panic") == has_panic, key
        assert entry["first_observed"] <= entry["last_observed"], key


def test_seed_entries_are_carried_over() -> None:
    ids = {k.lower() for k in KNOWN_PANIC_MODELS}
    for seed_id in ("mlx-community/gemma-4-31b-it-8bit", "mlx-community/Qwen3.5-27B-4bit",
                    "mlx-community/Qwen3.5-35B-A3B-8bit", "mlx-community/Qwen3.6-35B-A3B-8bit",
                    "mlx-community/Qwen3.5-122B-A10B-VLM-MTP-5bit", "mlx-community/Qwen3-Coder-Next-4bit",
                    "mlx-community/Qwen3.5-9B-4bit", "mlx-community/Qwen3.6-35B-A3B-VLM-MTP-8bit",
                    "mlx-community/kimi-k2.5"):
        assert seed_id.lower() in ids, seed_id
    # renamed to the upstream id, the seed's key still matches through an alias
    assert check_known_panic_model("mlx-community/Qwen3-VL-2B-Instruct")["model_id"] == "Qwen/Qwen3-VL-2B-Instruct"
    # the seed's "workflow:..." pseudo-id is a workload advisory now, not a model
    assert check_workload_advisory("gemma4_fused_via_mlx_lm_fuse") is not None
    assert models_by_tier("panic") == (GEMMA,)


BAD_DOCS: list[tuple[str, Any]] = []


def _bad(label: str, mutate: Any) -> None:
    doc = copy.deepcopy(_doc("panic_registry.json"))
    mutate(doc)
    BAD_DOCS.append((label, doc))


_bad("unknown tier", lambda d: d["models"][GEMMA].update(tier="catastrophic"))
_bad("missing recommendation", lambda d: d["models"][GEMMA].pop("recommendation"))
_bad("unknown field", lambda d: d["models"][GEMMA].update(colour="red"))
_bad("bad id", lambda d: d["models"].update({"not an id": d["models"][GEMMA]}))
_bad("bad gpu family", lambda d: d["models"][GEMMA]["error_classes"][0].update(gpu_family=["Intel"]))
_bad("bad date", lambda d: d["models"][GEMMA].update(first_observed="April 2026"))
_bad("bad upstream ref", lambda d: d["models"][GEMMA].update(upstream=["mlx 3186"]))
_bad("empty signature", lambda d: d["models"][GEMMA]["error_classes"][0].update(signature=""))
_bad("http link", lambda d: d["models"][GEMMA]["community"][0].update(url="http://x"))
_bad("list not object", lambda d: d.update(models=[]))
_bad("negative ttf", lambda d: d["models"][GEMMA]["reproductions"][0].update(time_to_failure_sec=-1))

RULE_ONLY: list[tuple[str, Any]] = []


def _rule(label: str, mutate: Any) -> None:
    doc = copy.deepcopy(_doc("panic_registry.json"))
    mutate(doc)
    RULE_ONLY.append((label, doc))


_rule("type outside the vocabulary", lambda d: d["models"][GEMMA]["error_classes"][0].update(type="kernel_panic"))
_rule("panic tier without a panic class",
      lambda d: d["models"]["mlx-community/Qwen3.5-9B-4bit"].update(tier="panic"))
_rule("tier milder than its classes",
      lambda d: d["models"]["mlx-community/Qwen3.5-35B-A3B-8bit"].update(tier="degradation"))
_rule("dates out of order", lambda d: d["models"][GEMMA].update(first_observed="2026-05-01"))
_rule("duplicate id ignoring case",
      lambda d: d["models"].update({GEMMA.upper(): d["models"][GEMMA]}))
_rule("alternative is itself listed",
      lambda d: d["models"][GEMMA].update(verified_safe_alternative="mlx-community/kimi-k2.5"))
_rule("no evidence", lambda d: d["models"]["mlx-community/Qwen3.6-35B-A3B-8bit"].update(
    community=[], upstream=[], reproductions=[]))


@pytest.mark.parametrize(("label", "doc"), BAD_DOCS, ids=[b[0] for b in BAD_DOCS])
def test_builtin_validator_and_jsonschema_agree_on_bad_documents(label: str, doc: Any) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(_doc("registry_schema.json"))
    assert list(validator.iter_errors(doc)), f"jsonschema accepted: {label}"
    assert validate.schema_errors(doc, _doc("registry_schema.json")), f"builtin accepted: {label}"


@pytest.mark.parametrize(("label", "doc"), RULE_ONLY, ids=[r[0] for r in RULE_ONLY])
def test_rules_catch_what_a_schema_cannot(label: str, doc: Any) -> None:
    assert validate.schema_errors(doc, _doc("registry_schema.json")) == []
    assert validate.validate_registry(doc), label


def test_builtin_validator_refuses_unknown_schema_keywords() -> None:
    with pytest.raises(ValueError, match="not supported"):
        validate.schema_errors({}, {"type": "object", "oneOf": []})


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize("spelling", [
    GEMMA,
    "MLX-Community/Gemma-4-31B-IT-8bit",
    "gemma-4-31b-it-8bit",
    "  GEMMA-4-31B-IT-8BIT  ",
    "/Users/x/models/gemma-4-31b-it-8bit",
    "/Users/x/models/gemma-4-31b-it-8bit/",
    "~/models/Gemma-4-31b-it-8bit",
    "./gemma-4-31b-it-8bit",
    "/Users/x/.cache/huggingface/hub/models--mlx-community--gemma-4-31b-it-8bit",
    "/Users/x/.cache/huggingface/hub/models--mlx-community--gemma-4-31b-it-8bit/snapshots/0123abcd",
    "https://huggingface.co/mlx-community/gemma-4-31b-it-8bit",
    Path("/opt/models/gemma-4-31b-it-8bit"),
])
def test_spellings_of_a_listed_model_match(spelling: Any) -> None:
    advisory = check_known_panic_model(spelling)
    assert advisory is not None and advisory["model_id"] == GEMMA
    assert advisory["tier"] == "panic"


@pytest.mark.parametrize("other", [
    "unsloth/gemma-4-31b-it-8bit",           # a different organisation
    "mlx-community/gemma-4-31b-it-4bit",     # another quantization: no reports
    "mlx-community/gemma-4-26b-a4b-it-4bit", # the verified safe alternative
    "mlx-community/gemma-4-31b-it",
    "gemma-4-31b",
    "google/gemma-4-31b-it",
    "/models--mlx-community--gemma-4-31b-it-4bit/snapshots/abc",
    "",
    "   ",
    "mlx-community/",
])
def test_models_without_reports_never_match(other: str) -> None:
    assert check_known_panic_model(other) is None


def test_relative_local_dir_is_matched_by_basename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models" / "gemma-4-31b-it-8bit").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    # "models/gemma-4-31b-it-8bit" looks like org/name, but it is an existing directory
    assert check_known_panic_model("models/gemma-4-31b-it-8bit")["model_id"] == GEMMA


def test_resolve_model_ref_rules() -> None:
    assert resolve_model_ref("Org/Name") == ("org", "name")
    assert resolve_model_ref("name") == (None, "name")
    assert resolve_model_ref("/a/b/c") == (None, "c")
    assert resolve_model_ref("C:\\models\\Name") == (None, "name")
    assert resolve_model_ref("/hub/models--o--n/snapshots/h") == ("o", "n")
    assert resolve_model_ref("hf.co/o/n") == ("o", "n")


def test_non_string_input_is_not_a_match() -> None:
    assert check_known_panic_model(None) is None  # type: ignore[arg-type]
    assert check_known_panic_model(42) is None  # type: ignore[arg-type]


# --------------------------------------------------------------------------- read-only data


def test_known_panic_models_is_read_only_and_deeply_frozen() -> None:
    entry = KNOWN_PANIC_MODELS[GEMMA]
    with pytest.raises(TypeError):
        KNOWN_PANIC_MODELS[GEMMA] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        entry["tier"] = "abort"
    with pytest.raises(AttributeError):
        entry["error_classes"].append({})
    with pytest.raises(TypeError):
        entry["error_classes"][0]["gpu_family"] = ("M9",)
    assert isinstance(entry["error_classes"][0]["gpu_family"], tuple)
    assert "tier" in repr(dict(entry)) and "read-only" in repr(KNOWN_PANIC_MODELS)


def test_check_returns_an_independent_copy() -> None:
    first = check_known_panic_model(GEMMA)
    first["tier"] = "degradation"
    first["error_classes"].clear()
    again = check_known_panic_model(GEMMA)
    assert again["tier"] == "panic" and again["error_classes"]
    json.dumps(again)  # plain JSON-serialisable data


# --------------------------------------------------------------------------- GPU families


def test_gpu_family_normalisation() -> None:
    assert normalize_gpu_family("m4") == "M4"
    assert normalize_gpu_family("Apple M4 Max") == "M4"
    assert normalize_gpu_family("applegpu_g17s") == "M5"
    assert normalize_gpu_family("applegpu_g13x") == "M1"
    assert normalize_gpu_family("intel") is None
    assert normalize_gpu_family(None) is None


def test_check_for_gpu_filters_observations() -> None:
    m1 = check_known_panic_model_for_gpu(GEMMA, gpu_family="M1")
    assert [o["gpu_family"] for o in m1["error_classes"]] == [["M1"]]
    assert m1["gpu_family_filter"] == "M1"
    assert check_known_panic_model_for_gpu(GEMMA, gpu_family="M5") is None
    assert len(check_known_panic_model_for_gpu(GEMMA)["error_classes"]) == 2
    # an observation with no family list concerns every family
    coder = check_known_panic_model_for_gpu("mlx-community/Qwen3-Coder-Next-4bit", gpu_family="M2")
    assert coder is not None and len(coder["error_classes"]) == 2
    with pytest.raises(ValueError):
        check_known_panic_model_for_gpu(GEMMA, gpu_family="Z80")
    assert check_known_panic_model_for_gpu("nobody/nothing", gpu_family="M1") is None


def test_models_by_tier_and_family() -> None:
    assert set(models_by_tier("degradation")) >= {"mlx-community/Qwen3.5-27B-4bit"}
    every = set(models_by_tier("panic")) | set(models_by_tier("abort")) | set(models_by_tier("degradation"))
    assert every == set(KNOWN_PANIC_MODELS)
    assert GEMMA in models_affecting_gpu_family("applegpu_g16s")
    assert "mlx-community/Qwen3.5-9B-4bit" in models_affecting_gpu_family("M5")
    assert GEMMA not in models_affecting_gpu_family("M5")
    with pytest.raises(ValueError):
        models_by_tier("fatal")


def test_workload_advisories() -> None:
    advisory = check_workload_advisory("LoRA-with-display-active")
    assert advisory["error_class"] == "gpu_watchdog" and advisory["workload"] == "lora_with_display_active"
    assert check_workload_advisory("knitting") is None
    assert set(WORKLOAD_ADVISORIES) >= {"lora_with_display_active", "long_context_prefill"}


# --------------------------------------------------------------------------- warnings


def test_warn_once_per_model_across_spellings(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert warn_if_known_panic_model(GEMMA) is True
        assert warn_if_known_panic_model("gemma-4-31b-it-8bit") is True
        assert warn_if_known_panic_model("/m/models--mlx-community--gemma-4-31b-it-8bit/snapshots/x") is True
        assert warn_if_known_panic_model("mlx-community/kimi-k2.5") is True
        assert warn_if_known_panic_model("someone/else") is False
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 2
    assert GEMMA in messages[0] and "panic" in messages[0]


def test_warn_is_thread_safe(caplog: pytest.LogCaptureFixture) -> None:
    barrier = threading.Barrier(16)

    def worker() -> None:
        barrier.wait()
        warn_if_known_panic_model("mlx-community/Qwen3.5-9B-4bit")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        threads = [threading.Thread(target=worker) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1


# --------------------------------------------------------------------------- policy


def test_defensive_mode_refuses_panic_tier(metalguard_home: Path) -> None:
    with pytest.raises(KnownPanicModelError) as info:
        enforce_known_panic_policy("gemma-4-31b-it-8bit", settings=get_settings(mode="defensive"))
    assert info.value.model_id == GEMMA
    assert info.value.advisory["tier"] == "panic"
    crumbs = (metalguard_home / "state" / "metal_breadcrumb.log").read_text()
    assert "KNOWN_PANIC_MODEL" in crumbs and GEMMA in crumbs


def test_defensive_mode_allows_with_kwarg_or_env(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert enforce_known_panic_policy(GEMMA, allow=True)["tier"] == "panic"
    assert any(GEMMA in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("METALGUARD_ALLOW_PANIC_MODELS", "1")
    assert enforce_known_panic_policy(GEMMA) is not None
    with pytest.raises(KnownPanicModelError):  # the kwarg beats the env
        enforce_known_panic_policy(GEMMA, allow=False)


def test_observer_mode_warns_and_returns(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("METALGUARD_MODE", "observer")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        advisory = enforce_known_panic_policy(GEMMA)
    assert advisory["model_id"] == GEMMA
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1


def test_milder_tiers_and_unknown_models_are_not_refused() -> None:
    assert enforce_known_panic_policy("mlx-community/Qwen3.5-9B-4bit")["tier"] == "abort"
    assert enforce_known_panic_policy("mlx-community/Qwen3.5-27B-4bit")["tier"] == "degradation"
    assert enforce_known_panic_policy("mlx-community/Llama-3.2-1B-Instruct-4bit") is None


def test_kill_switch_does_not_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_DISABLED", "1")
    assert enforce_known_panic_policy(GEMMA) is not None


def test_importing_the_registry_reads_nothing() -> None:
    import subprocess
    import sys

    code = ("import metal_guard.knowledge.registry as r, metal_guard.knowledge.advisories as a, "
            "metal_guard.knowledge.patches as p, sys; "
            "print(r._data is None, a._data is None, 'mlx' in sys.modules, 'wrapt' in sys.modules, "
            "'langchain_community' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "True", "False", "False", "False"], out.stderr
