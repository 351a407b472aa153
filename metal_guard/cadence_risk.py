"""How long a model must wait between two loads: the risk-scaled interval of L9 cadence.

The rule (data in ``data/cadence_rules.json``, sources listed there and in ``docs/state.md``):

1. ``METALGUARD_CADENCE_MIN_INTERVAL_SEC`` (or ``min_interval_sec=``) set → exactly that, in
   both directions: it can lower the interval below every floor (0 turns the rule off) or raise
   it above every band.
2. Otherwise the interval is the band of the model's **size relative to the GPU working set**
   (the budget ``recommended_config()`` reports: Metal's recommended working set, else MLX's
   memory limit, else 75 % of RAM): under 10 % → 0 s, under 25 % → 30 s, under 50 % → 90 s,
   above → 180 s (the seed's value). A metal-guard tiny model, or any model under 100 MB,
   never waits. A model whose size cannot be told gets the seed's 180 s.
3. The result is raised to the floors: the known-panic registry's floor for the model's tier
   (``panic`` → 180 s) and the gemma-4 family's 90 s.

The size comes from the peak ledger when a load was measured, else from local safetensors, the
Hugging Face cache or the model name (:mod:`metal_guard.modelsize`). Nothing here imports MLX.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger("metal_guard.cadence")

__all__ = ["CadenceInterval", "cadence_rules", "gpu_budget", "risk_interval"]

GB = 1_000_000_000


@dataclass(frozen=True)
class CadenceInterval:
    """The same-model interval for one model and why. ``source`` is one of ``setting``,
    ``size``, ``tiny``, ``unknown_size``, ``registry`` or ``gemma4_floor``."""

    seconds: float
    source: str
    reason: str
    size_bytes: int | None = None
    size_source: str | None = None
    budget_bytes: int | None = None
    budget_source: str | None = None

    @property
    def ratio(self) -> float | None:
        if not self.size_bytes or not self.budget_bytes:
            return None
        return self.size_bytes / self.budget_bytes

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        return out


@functools.lru_cache(maxsize=1)
def cadence_rules() -> dict[str, Any]:
    """The packaged rule table (validated on first read)."""
    raw = resources.files("metal_guard").joinpath("data/cadence_rules.json").read_text("utf-8")
    rules = json.loads(raw)
    validate_rules(rules)
    return dict(rules)


def validate_rules(rules: Any) -> None:
    """Raise ``ValueError`` unless ``rules`` is a well-formed cadence rule table."""
    if not isinstance(rules, dict) or rules.get("schema_version") != 1:
        raise ValueError("cadence rules: schema_version 1 expected")
    bands = rules.get("size_bands")
    if not isinstance(bands, list) or not bands:
        raise ValueError("cadence rules: size_bands must be a non-empty list")
    last = 0.0
    for i, band in enumerate(bands):
        ratio, sec = band.get("max_ratio"), band.get("interval_sec")
        if not isinstance(sec, (int, float)) or isinstance(sec, bool) or sec < 0:
            raise ValueError(f"cadence rules: band {i} needs interval_sec >= 0")
        if ratio is None:
            if i != len(bands) - 1:
                raise ValueError("cadence rules: only the last band may be open-ended")
            continue
        if not isinstance(ratio, (int, float)) or ratio <= last:
            raise ValueError("cadence rules: max_ratio must increase")
        last = float(ratio)
    if bands[-1].get("max_ratio") is not None:
        raise ValueError("cadence rules: the last band must be open-ended (max_ratio null)")
    secs = [b["interval_sec"] for b in bands]
    if secs != sorted(secs):
        raise ValueError("cadence rules: intervals must not shrink as the ratio grows")
    for key in ("unknown_size_interval_sec", "tiny_model_max_bytes", "gemma4_same_model_floor_sec"):
        value = rules.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"cadence rules: {key} must be a number >= 0")
    floors = rules.get("registry_tier_floors_sec")
    if not isinstance(floors, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in floors.values()):
        raise ValueError("cadence rules: registry_tier_floors_sec must map tiers to seconds >= 0")


def gpu_budget() -> tuple[int | None, str]:
    """The memory a model competes for: the GPU working set (``recommended_config()``), else
    MLX's memory limit (only if MLX is already imported), else 75 % of RAM."""
    try:
        from metal_guard.hardware import recommended_config

        hw = recommended_config()
    except Exception as exc:
        log.debug("hardware description unavailable: %s", exc)
        hw = {}
    ws = hw.get("recommended_working_set_bytes")
    if isinstance(ws, int) and ws > 0:
        return ws, str(hw.get("recommended_working_set_source") or "working_set")
    try:
        from metal_guard import backend

        limit = backend.get_memory_limit(load=False)
    except Exception:
        limit = None
    if isinstance(limit, int) and limit > 0:
        return limit, "mlx_memory_limit"
    total = hw.get("memory_total_bytes")
    if isinstance(total, int) and total > 0:
        return int(total * 0.75), "estimate_75pct_of_ram"
    return None, "unknown"


def _is_tiny_model_dir(ref: str) -> bool:
    try:
        path = Path(ref).expanduser()
        if not path.is_dir():
            return False
        from metal_guard.tinymodel import is_tiny_model

        return is_tiny_model(path)
    except (OSError, ValueError):
        return False


def model_size(ref: str) -> tuple[int | None, str]:
    """Weight bytes of ``ref`` (ledger peak first, then local files / HF cache / name)."""
    try:
        from metal_guard.ledger import lookup_peak

        entry = lookup_peak(ref)
        if entry is not None and isinstance(entry.get("required_bytes"), int):
            return int(entry["required_bytes"]), "ledger"
    except Exception as exc:
        log.debug("ledger lookup failed for %s: %s", ref, exc)
    try:
        from metal_guard.modelsize import estimate_model_size

        est = estimate_model_size(ref)
        if est.size_bytes is not None:
            return int(est.size_bytes), est.source
    except Exception as exc:
        log.debug("size estimate failed for %s: %s", ref, exc)
    return None, "unknown"


def _band(ratio: float, rules: dict[str, Any]) -> tuple[float, float | None]:
    for band in rules["size_bands"]:
        limit = band["max_ratio"]
        if limit is None or ratio < limit:
            return float(band["interval_sec"]), limit
    return float(rules["size_bands"][-1]["interval_sec"]), None  # pragma: no cover


def _registry_tier(ref: str) -> tuple[str | None, str | None]:
    try:
        from metal_guard.knowledge.registry import check_known_panic_model

        advisory = check_known_panic_model(ref)
    except Exception as exc:
        log.debug("registry lookup failed for %s: %s", ref, exc)
        return None, None
    if advisory is None:
        return None, None
    return str(advisory.get("tier")), str(advisory.get("model_id"))


def risk_interval(model_ref: str | os.PathLike[str], *, size_bytes: int | None = None,
                  budget_bytes: int | None = None, rules: dict[str, Any] | None = None) -> CadenceInterval:
    """The risk-scaled same-model interval for loading ``model_ref`` (id or local path).

    ``size_bytes`` / ``budget_bytes`` override the looked-up numbers (tests, callers who know).
    """
    from metal_guard.knowledge.families import is_gemma4_family

    rules = rules or cadence_rules()
    ref = os.fspath(model_ref)
    size_source = "caller" if size_bytes is not None else None
    if size_bytes is None:
        if _is_tiny_model_dir(ref):
            return CadenceInterval(0.0, "tiny", "a metal-guard tiny test/demo model never waits")
        size_bytes, size_source = model_size(ref)
    budget_source = "caller" if budget_bytes is not None else None
    if budget_bytes is None:
        budget_bytes, budget_source = gpu_budget()
    if size_bytes is not None and size_bytes < rules["tiny_model_max_bytes"]:
        base, source = 0.0, "tiny"
        reason = (f"its {size_bytes / GB:.2f} GB of weights are under "
                  f"{rules['tiny_model_max_bytes'] / GB:.2f} GB; tiny models never wait")
    elif size_bytes is None or not budget_bytes:
        base, source = float(rules["unknown_size_interval_sec"]), "unknown_size"
        what = "its size" if size_bytes is None else "the GPU working set"
        reason = f"{what} could not be determined, so the conservative {base:.0f}s applies"
    else:
        ratio = size_bytes / budget_bytes
        base, _limit = _band(ratio, rules)
        source = "size"
        reason = (f"its ~{size_bytes / GB:.1f} GB of weights ({size_source}) are {ratio:.0%} of the "
                  f"{budget_bytes / GB:.1f} GB GPU working set ({budget_source})")
    seconds = base
    tier, registry_id = _registry_tier(ref)
    tier_floor = float(rules["registry_tier_floors_sec"].get(tier or "", 0.0))
    if tier_floor > seconds:
        seconds, source = tier_floor, "registry"
        reason = (f"{registry_id} is a {tier}-tier model in the known-panic registry "
                  f"(floor {tier_floor:.0f}s); {reason}")
    gemma = float(rules["gemma4_same_model_floor_sec"])
    if is_gemma4_family(ref) and gemma > seconds:
        seconds, source = gemma, "gemma4_floor"
        reason = (f"it is a gemma-4 family model (floor {gemma:.0f}s: the seed's panics #7/#11 "
                  f"came from back-to-back gemma-4 loads); {reason}")
    return CadenceInterval(seconds, source, reason, size_bytes, size_source, budget_bytes,
                           budget_source)


def explicit_interval(seconds: float, origin: str) -> CadenceInterval:
    """The interval when one is set (``origin`` names where: the variable or the argument)."""
    what = "turned off" if seconds == 0 else f"{seconds:g}s"
    return CadenceInterval(float(seconds), "setting", f"{origin} sets it ({what})")
