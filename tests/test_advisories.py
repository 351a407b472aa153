"""Version advisories and blocklists, against injected version sets (independent of the venv)."""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any

import pytest

from metal_guard.classify import ERROR_CLASS_NAMES
from metal_guard.knowledge import validate
from metal_guard.knowledge.advisories import (
    MLX_LM_VERSION_BLOCKLIST,
    MLX_VERSION_BLOCKLIST,
    VERSION_ADVISORIES,
    check_mlx_lm_version_blocked,
    check_mlx_version_blocked,
    check_version_advisories,
    check_version_blocked,
    installed_versions,
    log_version_advisories,
)

#: A stack with no advisory except the ones that hit every version.
CLEAN = {"mlx": "0.32.4", "mlx-lm": "0.32.2", "mlx-vlm": "0.7.10", "transformers": "5.24.0"}
ALWAYS = {"mlx-3350-allocator-pool-growth", "mlx-vlm-999-clear-cache-every-request"}


def _doc() -> Any:
    return json.loads(resources.files("metal_guard").joinpath("data", "advisories.json").read_text("utf-8"))


def ids(packages: dict[str, str | None], **kw: Any) -> set[str]:
    return {a["id"] for a in check_version_advisories(packages, **kw)}


# --------------------------------------------------------------------------- data


def test_shipped_advisories_pass_jsonschema_and_rules() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(resources.files("metal_guard").joinpath("data", "advisories_schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(_doc(), schema, cls=jsonschema.Draft202012Validator)
    assert validate.validate_advisories(_doc()) == []


def test_error_classes_use_the_classifier_vocabulary() -> None:
    doc = _doc()
    used = {a["error_class"] for a in doc["advisories"] if a["error_class"]}
    used |= {b["error_class"] for bl in doc["blocklists"].values() for b in bl if b["error_class"]}
    assert used <= ERROR_CLASS_NAMES


def test_corrected_facts() -> None:
    by_id = VERSION_ADVISORIES
    # mlx-vlm 0.4.5 never existed: the #967 fix is first released in 0.5.0
    assert by_id["mlx-vlm-967-turboquant-race"]["fixed_in"] == "0.5.0"
    assert "0.4.5" not in _doc()["releases"]["mlx-vlm"]
    # before mlx 0.32 a command-buffer OOM aborts uncatchably: the advice is subprocess isolation
    abort = by_id["mlx-3390-uncatchable-command-buffer-abort"]
    assert abort["affected"] == "<0.32.0" and "subprocess" in abort["mitigation"]
    # transformers is covered
    assert any(a["package"] == "transformers" for a in by_id.values())
    # the blocklists no longer tell users to pin a version other advisories flag
    assert "0.31.1" not in MLX_VERSION_BLOCKLIST["==0.31.2"]["upgrade_to"]
    assert MLX_LM_VERSION_BLOCKLIST["==0.31.3"]["upgrade_to"] == ">=0.32.0"


CONTRADICTIONS: list[tuple[str, Any]] = []


def _contradiction(label: str, mutate: Any) -> None:
    doc = copy.deepcopy(_doc())
    mutate(doc)
    CONTRADICTIONS.append((label, doc))


_contradiction("fix version that was never released",
               lambda d: d["advisories"][9].update(fixed_in="0.4.5"))
_contradiction("fix version inside the affected range",
               lambda d: d["advisories"][0].update(fixed_in="0.31.0"))
_contradiction("blocklist advice that another advisory flags (the seed's 'pin mlx-lm 0.31.2')",
               lambda d: d["blocklists"]["mlx-lm"][0].update(upgrade_to="==0.31.2"))
_contradiction("blocklist advice that includes the blocked version",
               lambda d: d["blocklists"]["mlx"][0].update(upgrade_to=">=0.31.0"))
_contradiction("invalid specifier", lambda d: d["advisories"][1].update(affected="<<0.31"))
_contradiction("duplicate id", lambda d: d["advisories"][2].update(id=d["advisories"][1]["id"]))
_contradiction("unknown error class", lambda d: d["advisories"][0].update(error_class="meltdown"))


@pytest.mark.parametrize(("label", "doc"), CONTRADICTIONS, ids=[c[0] for c in CONTRADICTIONS])
def test_rules_catch_contradictions(label: str, doc: Any) -> None:
    assert validate.validate_advisories(doc), label


def test_the_mutated_indices_are_what_the_tests_think() -> None:
    doc = _doc()
    assert doc["advisories"][9]["id"] == "mlx-vlm-967-turboquant-race"
    assert doc["advisories"][0]["affected"] == "<0.32.0"


# --------------------------------------------------------------------------- matching


def test_clean_stack_gets_only_the_unfixed_advisories() -> None:
    assert ids(CLEAN) == ALWAYS


@pytest.mark.parametrize(("package", "affected", "fixed", "advisory"), [
    ("mlx", "0.31.2", "0.32.0", "mlx-3390-uncatchable-command-buffer-abort"),
    ("mlx", "0.31.1", "0.31.2", "mlx-3348-thread-local-command-encoder"),
    ("mlx-lm", "0.31.2", "0.31.3", "mlx-lm-1128-think-start-id"),
    ("mlx-lm", "0.30.7", "0.31.1", "mlx-lm-883-unbounded-server-cache"),
    ("mlx-vlm", "0.4.4", "0.5.0", "mlx-vlm-967-turboquant-race"),
])
def test_boundary_versions(package: str, affected: str, fixed: str, advisory: str) -> None:
    assert advisory in ids({**CLEAN, package: affected})
    assert advisory not in ids({**CLEAN, package: fixed})


def test_range_edges_and_prereleases() -> None:
    rid = "mlx-3390-uncatchable-command-buffer-abort"
    assert rid in ids({**CLEAN, "mlx": "0.30.6"})
    assert rid in ids({**CLEAN, "mlx": "0.31.99"})
    # PEP 440: a dev build of the fix release sorts before it and is not yet fixed
    assert rid in ids({**CLEAN, "mlx": "0.32.0.dev20260424"})
    assert rid not in ids({**CLEAN, "mlx": "0.32.0.post1"})
    assert rid not in ids({**CLEAN, "mlx": "0.32.4+cpu"})


def test_requires_makes_an_advisory_conditional() -> None:
    rid = "transformers-mlx-vlm-1011-reasoning-effort"
    assert rid not in ids({**CLEAN, "transformers": "5.5.1"})  # mistral-common not installed
    assert rid in ids({**CLEAN, "transformers": "5.5.1", "mistral-common": "1.9.1"})
    assert rid in ids({**CLEAN, "transformers": "5.6.0.dev0", "mistral_common": "1.9.1"})
    assert rid not in ids({**CLEAN, "transformers": "5.6.0", "mistral-common": "1.9.1"})
    lc = "langchain-community-mlx-vs-mlx-lm-032"
    assert lc in ids({**CLEAN, "langchain-community": "0.4.2"})
    assert lc not in ids({**CLEAN, "langchain-community": "0.4.2", "mlx-lm": "0.31.3"})
    found = [a for a in check_version_advisories({**CLEAN, "langchain-community": "0.4.2"}) if a["id"] == lc]
    assert found[0]["requires_installed"] == {"mlx-lm": "0.32.2"}


def test_result_shape_and_order() -> None:
    found = check_version_advisories({"MLX": "0.31.2", "mlx_lm": "0.31.2", "mlx-vlm": "0.4.4"})
    assert [a["severity"] for a in found] == sorted(
        (a["severity"] for a in found), key=["info", "low", "medium", "high", "critical"].index, reverse=True)
    first = found[0]
    assert first["severity"] == "critical"
    assert {"package", "installed_version", "affected_spec", "issue", "url", "title", "symptom",
            "mitigation", "severity"} <= set(first)
    json.dumps(found)


def test_missing_packages_and_bad_versions(caplog: pytest.LogCaptureFixture) -> None:
    assert check_version_advisories({}) == []
    assert check_version_advisories({"mlx": None}) == []
    assert ids({"mlx": "not-a-version"}) == set()
    assert "unparseable" in caplog.text


def test_min_severity() -> None:
    stack = {"mlx": "0.31.2", "mlx-lm": "0.31.2", "mlx-vlm": "0.4.4"}
    severities = {a["severity"] for a in check_version_advisories(stack, min_severity="high")}
    assert severities <= {"high", "critical"} and "critical" in severities
    with pytest.raises(ValueError):
        check_version_advisories(stack, min_severity="apocalyptic")


def test_default_reads_installed_metadata_without_importing() -> None:
    versions = installed_versions()
    assert versions["mlx"] and versions["mlx-lm"] and versions["transformers"]
    found = check_version_advisories()
    assert all(a["installed_version"] == versions[a["package"]] for a in found)


def test_log_version_advisories(caplog: pytest.LogCaptureFixture) -> None:
    found = log_version_advisories({"mlx": "0.31.2"}, min_severity="critical")
    assert [a["id"] for a in found] == ["mlx-3390-uncatchable-command-buffer-abort"]
    assert any(r.levelname == "ERROR" and "mlx#3390" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- blocklists


def test_blocklists() -> None:
    hit = check_mlx_version_blocked("0.31.2")
    assert hit["package"] == "mlx" and hit["version"] == "0.31.2" and hit["severity"] == "critical"
    assert check_mlx_version_blocked("0.31.1") is None
    assert check_mlx_version_blocked("0.32.0") is None
    assert check_mlx_lm_version_blocked("0.31.3")["upstream"]
    assert check_mlx_lm_version_blocked("0.31.2") is None
    assert check_version_blocked("MLX_LM", packages={"mlx-lm": "0.31.3"}) is not None
    assert check_version_blocked("mlx-lm", packages={}) is None
    assert check_version_blocked("transformers", "5.0.0") is None
    with pytest.raises(TypeError):
        MLX_VERSION_BLOCKLIST["==0.31.2"]["severity"] = "low"
