"""One gemma-4 rule, from data/model_families.json, shared by cadence and the isolation worker."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from metal_guard import cadence
from metal_guard.isolation import helpers
from metal_guard.knowledge import families
from metal_guard.knowledge.registry import KNOWN_PANIC_MODELS


def _data() -> dict:
    text = resources.files("metal_guard").joinpath("data", families.DATA_FILE).read_text("utf-8")
    return json.loads(text)


def test_cadence_and_worker_use_the_same_function() -> None:
    assert cadence.is_gemma4_family is families.is_gemma4_family
    assert helpers.is_gemma4_family is families.is_gemma4_family


@pytest.mark.parametrize(("model", "want"), [
    # the two names the old copies disagreed on
    ("mlx-community/gemma-4b-it", False),   # Gemma 3, 4B: not the gemma-4 family
    ("gemma-4b-it", False),
    ("/models/Gemma_4_12B", True),
    ("Gemma_4_12B", True),
    # the rest of both old tables
    ("mlx-community/gemma-4-31b-it-8bit", True), ("mlx-community/gemma-4-26b-a4b-it-4bit", True),
    ("mlx-community/gemma-4-e4b-it-4bit", True), ("unsloth/gemma-4-E2B-it", True),
    ("google/gemma4-e4b", True), ("/Users/me/models/gemma-4-31b-it-8bit/", True),
    ("C:\\models\\gemma-4-31b-it", True), ("gemma-4", True), ("gemma4", True),
    ("gemma-3-27b-it", False), ("mlx-community/gemma-3-4b-it-4bit", False), ("gemma-42x", False),
    ("llama-4", False), ("mlx-community/Phi-4-mini-instruct-4bit", False),
    ("gemma-4-31b-it/weights", False),  # only the last component names the model
    ("", False), ("/", False),
])
def test_gemma4_rule(model: str, want: bool) -> None:
    assert families.is_gemma4_family(model) is want
    assert cadence.is_gemma4_family(model) is want
    assert helpers.is_gemma4_family(model) is want


def test_path_objects_and_hostile_values() -> None:
    assert families.is_gemma4_family(Path("/m/gemma-4-31b-it-8bit")) is True
    assert families.is_gemma4_family(None) is False
    assert families.is_gemma4_family(4) is False
    assert families.is_gemma4_family("gemma-4-31b-it" + "x" * families.MAX_NAME_CHARS) is False
    assert families.is_gemma4_family("gemma-4-31b\nit") is False  # no line smuggled into a match


def test_data_file_examples_hold() -> None:
    for name, spec in _data()["families"].items():
        for example in spec["matches"]:
            assert families.is_model_family(example, name), (name, example)
        for example in spec["does_not_match"]:
            assert not families.is_model_family(example, name), (name, example)


def test_every_gemma4_registry_entry_is_in_the_family() -> None:
    listed = [k for k in KNOWN_PANIC_MODELS if "gemma-4" in k.lower() or "gemma4" in k.lower()]
    assert listed, "the registry lists gemma-4 models"
    for key in listed:
        assert families.is_gemma4_family(key), key
        for alias in KNOWN_PANIC_MODELS[key].get("aliases", ()):
            assert families.is_gemma4_family(alias), alias


def test_unknown_family_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        families.is_model_family("gemma-4", "no-such-family")
