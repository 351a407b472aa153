"""modelsize.py: size estimates from names, real safetensors in a Hugging Face cache layout, config.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from metal_guard import modelsize


@pytest.mark.parametrize(
    ("name", "gb"),
    [
        ("mlx-community/Mistral-Small-3.2-24B-Instruct-2506-8bit", 24.0),
        ("mlx-community/Phi-4-mini-instruct-4bit", 2.0),
        ("mlx-community/gemma-4-26b-a4b-it-4bit", 13.0),
        ("mlx-community/gemma-4-e4b-it-4bit", None),
        ("meta-llama/Llama-3.2-3B-Instruct", 6.0),
        ("HuggingFaceTB/SmolLM-135M-Instruct-bf16", 0.27),
        ("some/model-7b-6bit", 5.25),
        ("some/model-70B-3bit", 26.25),
        ("some/model-large-2bit", 17.5),
        ("some/Qwen3-4B-mxfp4", 2.0),
        ("no-hints-at-all", None),
    ],
)
def test_estimate_from_name(name: str, gb: float | None) -> None:
    assert modelsize.estimate_model_size_from_name(name) == (None if gb is None else pytest.approx(gb))


def test_quantization_from_config() -> None:
    assert modelsize.quantization_from_config({"quantization": {"group_size": 64, "bits": 4}}) == "4bit"
    assert modelsize.quantization_from_config({"quantization_config": {"bits": 8}}) == "8bit"
    assert modelsize.quantization_from_config({"torch_dtype": "bfloat16"}) == "bf16"
    assert modelsize.quantization_from_config({}) is None


def _hf_cache(root: Path, repo: str, shards: dict[str, int], *, index_total: int | None = None,
              config: dict[str, Any] | None = None) -> Path:
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "blobs").mkdir(parents=True)
    snap = base / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("abc123")
    for i, (name, size) in enumerate(shards.items()):
        blob = base / "blobs" / f"blob{i}"
        blob.write_bytes(b"\0" * size)
        os.symlink(blob, snap / name)
    (snap / "config.json").write_text(json.dumps(config or {"quantization": {"bits": 4, "group_size": 64}}))
    if index_total is not None:
        (snap / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": index_total}}))
    return snap


def test_size_from_hf_cache_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    snap = _hf_cache(cache, "acme/Widget-7B-4bit", {"model-00001-of-00002.safetensors": 3000,
                                                    "model-00002-of-00002.safetensors": 1234})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    est = modelsize.estimate_model_size("acme/Widget-7B-4bit")
    assert (est.source, est.size_bytes, est.quantization, est.files) == ("hf_cache", 4234, "4bit", 2)
    assert est.path == str(snap)
    # a partially downloaded snapshot: the index knows the full size
    _hf_cache(cache, "acme/Partial-4bit", {"model-00001-of-00002.safetensors": 100}, index_total=99_000)
    assert modelsize.estimate_model_size("acme/Partial-4bit").size_bytes == 99_000
    # not cached: fall back to the name
    miss = modelsize.estimate_model_size("acme/Other-7B-8bit")
    assert (miss.source, miss.size_bytes) == ("name", 7_000_000_000)


def test_hf_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert modelsize.hf_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert modelsize.hf_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "direct"))
    assert modelsize.hf_cache_dir() == tmp_path / "direct"
