"""The known-panic model registry: which MLX models crashed or panicked whose Macs, and what helped.

The data lives in ``metal_guard/data/panic_registry.json`` (schema ``registry_schema.json``,
rules in :mod:`metal_guard.knowledge.validate`). It is read and validated once, on first use;
importing this module does no I/O. :data:`KNOWN_PANIC_MODELS` is a read-only mapping of
deeply frozen entries; every ``check_*`` function returns a fresh, mutable ``dict`` copy.

Matching (:func:`resolve_model_ref`, see ``docs/knowledge.md``):

* case-insensitive;
* ``org/name`` matches the entry with that id, one of its ``aliases``, or ``name`` published by
  one of its ``also_published_by`` organisations. A different organisation does **not** match;
* a bare ``name`` matches the entry whose id (or alias) has that repository name;
* a local directory (absolute, ``~``, ``./`` or an existing path) is reduced to its last
  component, then matched as a bare name;
* a Hugging Face cache directory (``.../models--org--name`` or ``.../snapshots/<hash>`` below
  it) and a ``https://huggingface.co/org/name`` URL resolve to ``org/name``;
* a model with no reports never matches: other quantizations, sizes or variants of a listed
  model are different ids.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from metal_guard.knowledge._frozen import LazyMapping, freeze, thaw
from metal_guard.knowledge.advisories import with_legacy_keys as _seed_keys
from metal_guard.knowledge.validate import TIER_ORDER, load_schema, schema_errors

log = logging.getLogger("metal_guard.knowledge.registry")

__all__ = [
    "KNOWN_PANIC_MODELS",
    "TIERS",
    "WORKLOAD_ADVISORIES",
    "RegistryDataError",
    "check_known_panic_model",
    "check_known_panic_model_for_gpu",
    "check_workload_advisory",
    "detect_gpu_family",
    "enforce_known_panic_policy",
    "known_panic_policy",
    "models_affecting_gpu_family",
    "models_by_tier",
    "normalize_gpu_family",
    "resolve_model_ref",
    "warn_if_known_panic_model",
]

TIERS = TIER_ORDER
DATA_FILE = "panic_registry.json"


class RegistryDataError(ValueError):
    """The packaged registry file is unreadable or invalid (a packaging bug)."""


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Data:
    models: Mapping[str, Mapping[str, Any]]
    workloads: Mapping[str, Mapping[str, Any]]
    by_id: Mapping[str, str]  # lower-case id or alias -> key
    by_name: Mapping[str, tuple[str, ...]]  # lower-case repo name -> keys
    by_org_name: Mapping[tuple[str, str], str]  # (other org, name) -> key


_lock = threading.Lock()
_data: _Data | None = None


def _read() -> _Data:
    from importlib import resources

    try:
        text = resources.files("metal_guard").joinpath("data", DATA_FILE).read_text(encoding="utf-8")
        doc = json.loads(text)
    except (OSError, ValueError) as exc:
        raise RegistryDataError(f"{DATA_FILE} cannot be read: {exc}") from exc
    # Structure only: the cross-file vocabulary rules are enforced by the test suite and
    # `metal-guard registry validate`, so a broken classifier table cannot block model loads.
    errors = schema_errors(doc, load_schema("registry_schema.json"))
    if errors:
        raise RegistryDataError(f"{DATA_FILE} is invalid: " + "; ".join(errors[:5]))
    by_id: dict[str, str] = {}
    by_name: dict[str, list[str]] = {}
    by_org_name: dict[tuple[str, str], str] = {}
    for key, entry in doc["models"].items():
        for ident in (key, *entry.get("aliases", ())):
            by_id[ident.lower()] = key
            by_name.setdefault(ident.lower().split("/", 1)[1], []).append(key)
        name = key.lower().split("/", 1)[1]
        for org in entry.get("also_published_by", ()):
            by_org_name[(org.lower(), name)] = key
    rank = {k: TIER_ORDER.index(e["tier"]) for k, e in doc["models"].items()}
    return _Data(
        models=freeze(doc["models"]),
        workloads=freeze({k: _seed_keys(v) for k, v in doc.get("workloads", {}).items()}),
        by_id=MappingProxyType(by_id),
        # most severe tier first, then alphabetical: a bare name that is ambiguous resolves
        # deterministically to the entry that matters most
        by_name=MappingProxyType({n: tuple(sorted(set(ks), key=lambda k: (-rank[k], k)))
                                  for n, ks in by_name.items()}),
        by_org_name=MappingProxyType(by_org_name),
    )


def _load() -> _Data:
    global _data
    data = _data
    if data is None:
        with _lock:
            if _data is None:
                _data = _read()
            data = _data
    return data


class _RegistryMapping(LazyMapping):
    def __init__(self, attr: str, label: str) -> None:
        super().__init__(label)
        self._attr = attr

    def _target(self) -> Mapping[str, Any]:
        return getattr(_load(), self._attr)  # type: ignore[no-any-return]


#: Model id -> frozen entry. Exact (case-sensitive) keys; use :func:`check_known_panic_model`
#: for matching.
KNOWN_PANIC_MODELS: Mapping[str, Any] = _RegistryMapping("models", "KNOWN_PANIC_MODELS")
#: Workload id -> frozen advisory (e.g. ``lora_with_display_active``).
WORKLOAD_ADVISORIES: Mapping[str, Any] = _RegistryMapping("workloads", "WORKLOAD_ADVISORIES")


# --------------------------------------------------------------------------- matching

_HF_URL = re.compile(r"^(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/([^/?#]+)/([^/?#]+)", re.I)
_HF_CACHE = re.compile(r"^models--(.+)$", re.I)


def resolve_model_ref(model_id: str | os.PathLike[str]) -> tuple[str | None, str]:
    """``(org, name)`` (lower case; ``org`` may be ``None``) for an id, URL or local path."""
    raw = os.fspath(model_id).strip()
    if not raw:
        return None, ""
    url = _HF_URL.match(raw)
    if url:
        return url.group(1).lower(), url.group(2).lower()
    text = raw.replace("\\", "/")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts:
        return None, ""
    for part in reversed(parts):  # .../models--org--name[/snapshots/<hash>]
        cached = _HF_CACHE.match(part)
        if cached:
            bits = cached.group(1).split("--")
            if len(bits) == 2 and all(bits):
                return bits[0].lower(), bits[1].lower()
            return None, bits[-1].lower()
    is_path = (
        text.startswith(("/", "~", "./", "../"))
        or len(parts) > 2
        or bool(re.match(r"^[A-Za-z]:/", text))
        or (len(parts) == 2 and os.path.isdir(os.path.expanduser(raw)))
    )
    if is_path or len(parts) == 1:
        return None, parts[-1].lower()
    return parts[0].lower(), parts[1].lower()


def _match_key(model_id: str | os.PathLike[str]) -> str | None:
    if not isinstance(model_id, (str, os.PathLike)):
        return None
    org, name = resolve_model_ref(model_id)
    if not name:
        return None
    data = _load()
    if org is None:
        keys = data.by_name.get(name)
        return keys[0] if keys else None
    return data.by_id.get(f"{org}/{name}") or data.by_org_name.get((org, name))


def _advisory(key: str, model_id: object) -> dict[str, Any]:
    entry: dict[str, Any] = thaw(_load().models[key])
    entry.setdefault("aliases", [])
    entry.setdefault("degradations", [])
    entry.setdefault("panic_signature", next(
        (o["signature"] for o in entry["error_classes"]), None))
    entry["model_id"] = key
    entry["matched_as"] = os.fspath(model_id) if isinstance(model_id, os.PathLike) else model_id
    return entry


def check_known_panic_model(model_id: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The registry advisory for ``model_id`` (a copy, with ``model_id`` set to the registry
    id and ``matched_as`` to the input), or ``None`` when the model has no reports."""
    key = _match_key(model_id)
    return None if key is None else _advisory(key, model_id)


# --------------------------------------------------------------------------- GPU families

_GEN_TO_FAMILY = {13: "M1", 14: "M2", 15: "M3", 16: "M4", 17: "M5"}


def normalize_gpu_family(value: str | None) -> str | None:
    """``"m4"``, ``"M4 Max"``, ``"Apple M4 Pro"``, ``"applegpu_g16s"`` -> ``"M4"``; else ``None``."""
    text = (value or "").strip().lower()
    arch = re.match(r"^applegpu_g(\d+)", text)
    if arch:
        return _GEN_TO_FAMILY.get(int(arch.group(1)))
    chip = re.search(r"(?:^|apple\s+|\b)m(\d{1,2})\b", text)
    return f"M{int(chip.group(1))}" if chip else None


def detect_gpu_family() -> str | None:
    """This machine's Apple GPU family without initialising the GPU (``None`` off Apple Silicon)."""
    try:
        from metal_guard import hardware, macos

        info = hardware.apple_gpu_family(load=False)  # only if MLX is already loaded
        family = normalize_gpu_family(str(info.get("family") or ""))
        if family:
            return family
        brand = macos.read_sysctl("machdep.cpu.brand_string") if macos.is_darwin() else None
        return normalize_gpu_family(brand)
    except Exception:  # detection is best effort
        log.debug("GPU family detection failed", exc_info=True)
        return None


def check_known_panic_model_for_gpu(
    model_id: str | os.PathLike[str], *, gpu_family: str | None = None
) -> dict[str, Any] | None:
    """Like :func:`check_known_panic_model`, keeping only the observations that concern
    ``gpu_family`` (or list no family). ``None`` when nothing is left or the family is
    unknown-and-unrecognised; with ``gpu_family=None`` nothing is filtered."""
    advisory = check_known_panic_model(model_id)
    if advisory is None or gpu_family is None:
        return advisory
    family = normalize_gpu_family(gpu_family)
    if family is None:
        raise ValueError(f"unrecognised GPU family {gpu_family!r}; expected M1, M2, ... or applegpu_gNN")

    def keep(obs: Mapping[str, Any]) -> bool:
        return not obs["gpu_family"] or family in obs["gpu_family"]

    advisory["error_classes"] = [o for o in advisory["error_classes"] if keep(o)]
    advisory["degradations"] = [o for o in advisory["degradations"] if keep(o)]
    if not advisory["error_classes"] and not advisory["degradations"]:
        return None
    advisory["gpu_family_filter"] = family
    return advisory


def models_by_tier(tier: str) -> tuple[str, ...]:
    """Sorted registry ids with ``tier`` (``panic``, ``abort`` or ``degradation``)."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {', '.join(TIERS)}")
    return tuple(sorted(k for k, e in _load().models.items() if e["tier"] == tier))


def models_affecting_gpu_family(family: str) -> tuple[str, ...]:
    """Sorted registry ids with an observation confirmed on ``family`` (e.g. ``"M4"``)."""
    norm = normalize_gpu_family(family)
    if norm is None:
        raise ValueError(f"unrecognised GPU family {family!r}")
    return tuple(sorted(
        key for key, entry in _load().models.items()
        if any(norm in o["gpu_family"] for o in (*entry["error_classes"], *entry.get("degradations", ())))
    ))


def check_workload_advisory(workload_id: str) -> dict[str, Any] | None:
    """The advisory for a workload id (``"lora_with_display_active"``; ``-`` and case are
    ignored), as a copy with ``workload`` set, or ``None``."""
    key = str(workload_id).strip().lower().replace("-", "_")
    entry = _load().workloads.get(key)
    if entry is None:
        return None
    out: dict[str, Any] = thaw(entry)
    out["workload"] = key
    return out


# --------------------------------------------------------------------------- warnings + policy

_warn_lock = threading.Lock()
_warned: set[str] = set()
_warned_pid = os.getpid()


def _first_warning(key: str) -> bool:
    global _warned_pid
    with _warn_lock:
        if _warned_pid != os.getpid():  # a forked child is a new process: warn again
            _warned.clear()
            _warned_pid = os.getpid()
        if key in _warned:
            return False
        _warned.add(key)
        return True


def _reset_warnings() -> None:
    """Forget which models were warned about (tests)."""
    with _warn_lock:
        _warned.clear()


def warn_if_known_panic_model(model_id: str | os.PathLike[str]) -> bool:
    """Log one WARNING per process per registry entry when ``model_id`` matches.

    Returns ``True`` when the model is in the registry (whether or not this call logged),
    ``False`` otherwise. Different spellings of one model (``Org/Name``, a local path) share one
    warning. Thread-safe.
    """
    advisory = check_known_panic_model(model_id)
    if advisory is None:
        return False
    if _first_warning(advisory["model_id"]):
        log.warning(
            "known %s-tier model %s (as %r): %s Recommendation: %s Upstream: %s",
            advisory["tier"], advisory["model_id"], advisory["matched_as"], advisory["summary"],
            advisory["recommendation"], ", ".join(advisory["upstream"]) or "none",
        )
    return True


def known_panic_policy(advisory: Mapping[str, Any], *, allow: bool | None = None,
                       settings: Any = None) -> str:
    """``"refuse"`` or ``"warn"``: what :func:`enforce_known_panic_policy` does with ``advisory``."""
    if settings is None:
        from metal_guard.settings import get_settings

        settings = get_settings()
    allowed = settings.allow_panic_models if allow is None else bool(allow)
    if advisory["tier"] == "panic" and settings.mode == "defensive" and not allowed \
            and not settings.disabled:
        return "refuse"
    return "warn"


def enforce_known_panic_policy(
    model_id: str | os.PathLike[str], *, allow: bool | None = None, settings: Any = None
) -> dict[str, Any] | None:
    """The load-time policy the guards and adapters apply (one call, before loading).

    * model not in the registry -> ``None``;
    * ``tier == "panic"`` in defensive mode, not allowed (``allow`` if given, else the
      ``allow_panic_models`` setting / ``METALGUARD_ALLOW_PANIC_MODELS``) ->
      :class:`~metal_guard.errors.KnownPanicModelError` (a breadcrumb is written);
    * otherwise (observer mode, allowed, milder tiers, metal-guard disabled) -> warn once per
      process and return the advisory.
    """
    advisory = check_known_panic_model(model_id)
    if advisory is None:
        return None
    if known_panic_policy(advisory, allow=allow, settings=settings) == "refuse":
        from metal_guard.errors import KnownPanicModelError

        _breadcrumb(advisory)
        log.error("refusing known panic-tier model %s (as %r) in defensive mode",
                  advisory["model_id"], advisory["matched_as"])
        raise KnownPanicModelError(advisory["model_id"], advisory)
    warn_if_known_panic_model(model_id)
    return advisory


def _breadcrumb(advisory: Mapping[str, Any]) -> None:
    try:
        from metal_guard.breadcrumbs import breadcrumb_with_meta

        breadcrumb_with_meta("KNOWN_PANIC_MODEL", f"refused {advisory['model_id']}",
                             tier=advisory["tier"], matched_as=advisory["matched_as"])
    except Exception:  # a breadcrumb must never change the outcome
        log.debug("breadcrumb failed", exc_info=True)
