"""How big is a model? Weight-size estimates from disk or from the model's name.

In order of preference: the ``*.safetensors`` of a local directory, the snapshot of a Hugging
Face cache entry (``org/name``), then the seed's name rule (parameter count x bytes per
parameter of the quantisation in the name). The quantisation comes from ``config.json`` when
there is one, else from the name. Nothing here imports MLX or downloads anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ModelSize",
    "estimate_model_size",
    "estimate_model_size_from_name",
    "hf_cache_dir",
    "hf_snapshot_dir",
    "quantization_from_config",
]

GB = 1_000_000_000

_QUANT_NAME = (  # first match wins: (regex, label, bytes per parameter)
    (re.compile(r"16bit|fp16|bf16", re.I), "16bit", 2.0),
    (re.compile(r"8bit|int8", re.I), "8bit", 1.0),
    (re.compile(r"6bit", re.I), "6bit", 0.75),
    (re.compile(r"4bit|int4|(?<![a-z])q4|mxfp4|tq4", re.I), "4bit", 0.5),
    (re.compile(r"3bit|int3|tq3", re.I), "3bit", 0.375),
    (re.compile(r"2bit|int2", re.I), "2bit", 0.25),
)
_PARAMS_RE = re.compile(r"\b(\d+(?:\.\d+)?)\s*([bm])\b", re.I)
_PARAMS_WORDS = (("mini", 4.0), ("small", 7.0), ("medium", 13.0), ("large", 70.0), ("xl", 13.0))


@dataclass(frozen=True)
class ModelSize:
    """Estimated weight size of a model. ``source``: ``safetensors`` (local directory),
    ``hf_cache`` (Hugging Face cache snapshot), ``name`` (parsed from the id) or ``unknown``."""

    model: str
    size_bytes: int | None
    source: str
    quantization: str | None = None
    path: str | None = None
    files: int = 0

    @property
    def size_gb(self) -> float | None:
        return None if self.size_bytes is None else self.size_bytes / GB


def _quant_from_name(name: str) -> tuple[str | None, float]:
    for pattern, label, per_param in _QUANT_NAME:
        if pattern.search(name):
            return label, per_param
    return None, 2.0


def estimate_model_size_from_name(name: str) -> float | None:
    """Seed rule: parameters (``24B``, ``135M``, or mini/small/medium/large/xl) x bytes per
    parameter from the quantisation in the name (fp16 when none). GB, or ``None``."""
    base = str(name).rstrip("/").rsplit("/", 1)[-1]
    match = _PARAMS_RE.search(base)
    if match:
        params_b = float(match.group(1)) / (1000.0 if match.group(2).lower() == "m" else 1.0)
    else:
        lowered = base.lower()
        params_b = next((v for word, v in _PARAMS_WORDS if word in lowered), 0.0)
        if not params_b:
            return None
    return round(params_b * _quant_from_name(base)[1], 3)


def quantization_from_config(config: dict[str, Any]) -> str | None:
    """``{"quantization": {"bits": 4}}`` → ``"4bit"``; else the dtype (``bf16``/``fp16``/``fp32``)."""
    for key in ("quantization", "quantization_config"):
        q = config.get(key)
        if isinstance(q, dict) and isinstance(q.get("bits"), int):
            return f"{q['bits']}bit"
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "").lower()
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment at call time."""
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(env[var]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return xdg / "huggingface" / "hub"


def hf_snapshot_dir(repo_id: str, *, cache_dir: Path | None = None) -> Path | None:
    """The cached snapshot of ``org/name`` (``refs/main`` if present, else the newest)."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    root = (cache_dir or hf_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    snaps = root / "snapshots"
    try:
        ref = (root / "refs" / "main").read_text().strip()
        if ref and (snaps / ref).is_dir():
            return snaps / ref
        candidates = [p for p in snaps.iterdir() if p.is_dir()]
    except OSError:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / "config.json").read_text("utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def estimate_model_size(model: str | os.PathLike[str], *, cache_dir: Path | None = None) -> ModelSize:
    """Size ``model`` from its weights on disk when possible, else from its name."""
    name = os.fspath(model)
    local = Path(name).expanduser()
    path, source = (local, "safetensors") if local.is_dir() else (None, "unknown")
    if path is None:
        snap = hf_snapshot_dir(name, cache_dir=cache_dir)
        path, source = (snap, "hf_cache") if snap is not None else (None, "unknown")
    if path is not None:
        files = sorted(path.glob("*.safetensors"))
        total = 0
        for f in files:
            with contextlib.suppress(OSError):  # a dangling blob link = incomplete download
                total += f.stat().st_size
        try:
            index = json.loads((path / "model.safetensors.index.json").read_text("utf-8"))
            indexed = int(index.get("metadata", {}).get("total_size") or 0)
        except (OSError, ValueError, AttributeError, TypeError):
            indexed = 0
        if files or indexed:
            quant = quantization_from_config(_read_config(path)) or _quant_from_name(name)[0]
            return ModelSize(name, max(total, indexed), source, quant, str(path), len(files))
    gb = estimate_model_size_from_name(name)
    return ModelSize(name, None if gb is None else int(gb * GB), "name" if gb is not None else "unknown",
                     _quant_from_name(name)[0])
