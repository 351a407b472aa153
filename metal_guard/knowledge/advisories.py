"""Version advisories and blocklists for mlx, mlx-lm, mlx-vlm, transformers and langchain-community.

The data lives in ``metal_guard/data/advisories.json`` (schema ``advisories_schema.json``).
Affected ranges are PEP 440 specifier sets evaluated with :mod:`packaging`; an advisory may
also ``require`` other packages (e.g. a transformers range only matters with mistral-common
installed). Installed versions come from package metadata, so checking never imports MLX.
Every function takes an injectable ``packages`` mapping (``{"mlx": "0.31.2", "mlx-lm": None}``)
so results do not depend on what is installed: with ``packages`` given, a package missing from
it counts as not installed.

Versions compare as PEP 440 says, with one deliberate exception: a pre-release or development
build of a fix release (``0.32.0.dev20260424``) still counts as affected by ``<0.32.0``, because
such a snapshot may predate the fix (PEP 440 alone would exclude it from ``<0.32.0``).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from metal_guard.knowledge._frozen import LazyMapping, freeze, thaw
from metal_guard.knowledge.validate import load_schema, schema_errors

log = logging.getLogger("metal_guard.knowledge.advisories")

__all__ = [
    "MLX_LM_VERSION_BLOCKLIST",
    "MLX_VERSION_BLOCKLIST",
    "SEVERITIES",
    "VERSION_ADVISORIES",
    "WATCHED_PACKAGES",
    "AdvisoryDataError",
    "check_mlx_lm_version_blocked",
    "check_mlx_version_blocked",
    "check_version_advisories",
    "check_version_blocked",
    "doctor_section",
    "installed_versions",
    "log_version_advisories",
    "normalize_package_name",
    "with_legacy_keys",
]

DATA_FILE = "advisories.json"
SEVERITIES = ("info", "low", "medium", "high", "critical")
#: Packages checked when ``packages`` is not given.
WATCHED_PACKAGES = ("mlx", "mlx-lm", "mlx-vlm", "transformers", "langchain-community")


class AdvisoryDataError(ValueError):
    """The packaged advisories file is unreadable or invalid (a packaging bug)."""


def normalize_package_name(name: str) -> str:
    """PEP 503 normalisation: ``MLX_LM`` -> ``mlx-lm``."""
    return re.sub(r"[-_.]+", "-", str(name)).strip().lower()


_lock = threading.Lock()
_data: Mapping[str, Any] | None = None


def _load() -> Mapping[str, Any]:
    global _data
    data = _data
    if data is None:
        with _lock:
            if _data is None:
                _data = _read()
            data = _data
    return data


def _read() -> Mapping[str, Any]:
    from importlib import resources

    try:
        text = resources.files("metal_guard").joinpath("data", DATA_FILE).read_text(encoding="utf-8")
        doc = json.loads(text)
    except (OSError, ValueError) as exc:
        raise AdvisoryDataError(f"{DATA_FILE} cannot be read: {exc}") from exc
    errors = schema_errors(doc, load_schema("advisories_schema.json"))
    if errors:
        raise AdvisoryDataError(f"{DATA_FILE} is invalid: " + "; ".join(errors[:5]))
    frozen: Mapping[str, Any] = freeze({
        "advisories": doc["advisories"],
        "blocklists": {normalize_package_name(k): v for k, v in doc["blocklists"].items()},
        "by_id": {a["id"]: a for a in doc["advisories"]},
    })
    return frozen


class _Blocklist(LazyMapping):
    """Read-only ``{specifier: entry}`` view of one package's blocklist."""

    def __init__(self, package: str) -> None:
        super().__init__(f"{package.upper().replace('-', '_')}_VERSION_BLOCKLIST")
        self._package = package

    def _target(self) -> Mapping[str, Any]:
        return {e["versions"]: e for e in _load()["blocklists"].get(self._package, ())}


class _Advisories(LazyMapping):
    def __init__(self) -> None:
        super().__init__("VERSION_ADVISORIES")

    def _target(self) -> Mapping[str, Any]:
        return _load()["by_id"]  # type: ignore[no-any-return]


#: Advisory id -> frozen advisory.
VERSION_ADVISORIES: Mapping[str, Any] = _Advisories()
#: ``{"==0.31.2": entry}``: mlx versions known to crash; advice, not enforcement.
MLX_VERSION_BLOCKLIST: Mapping[str, Any] = _Blocklist("mlx")
#: ``{"==0.31.3": entry}``: mlx-lm versions known to crash.
MLX_LM_VERSION_BLOCKLIST: Mapping[str, Any] = _Blocklist("mlx-lm")


# --------------------------------------------------------------------------- versions


def installed_versions(names: Iterable[str] = WATCHED_PACKAGES) -> dict[str, str | None]:
    """``{normalised name: version or None}`` from package metadata (nothing is imported)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        norm = normalize_package_name(name)
        try:
            out[norm] = metadata.version(norm)
        except metadata.PackageNotFoundError:
            out[norm] = None
    return out


def _versions(packages: Mapping[str, str | None] | None, names: Iterable[str]) -> dict[str, str | None]:
    if packages is None:
        return installed_versions(names)
    given = {normalize_package_name(k): (None if v is None else str(v)) for k, v in packages.items()}
    return {normalize_package_name(n): given.get(normalize_package_name(n)) for n in names}


def _matches(spec: str, version: str | None, *, what: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if version is None:
        return False
    try:
        parsed = Version(version)
    except InvalidVersion:
        log.warning("ignoring unparseable version %r of %s", version, what)
        return False
    specs = SpecifierSet(spec)
    if specs.contains(parsed, prereleases=True):
        return True
    if not parsed.is_prerelease:
        return False
    # PEP 440 says "<0.32.0" excludes 0.32.0.dev1; a dev snapshot of the fix release may
    # predate the fix, so we count it as still affected by such a clause.
    base = Version(parsed.base_version)
    return all(
        (clause.operator == "<" and Version(clause.version) == base)
        or clause.contains(parsed, prereleases=True)
        for clause in specs
    )


def _severity_rank(severity: str) -> int:
    if severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}; expected one of {', '.join(SEVERITIES)}")
    return SEVERITIES.index(severity)


def check_version_advisories(
    packages: Mapping[str, str | None] | None = None, *, min_severity: str = "info"
) -> list[dict[str, Any]]:
    """Advisories that apply to the installed (or given) versions, most severe first.

    Each result is a copy of the advisory with ``installed_version`` and ``affected_spec``
    added (and ``requires_installed`` for conditional ones). ``packages`` maps package names
    (any spelling) to versions or ``None``; when given, unlisted packages count as absent.
    """
    floor = _severity_rank(min_severity)
    advisories = _load()["advisories"]
    names = {a["package"] for a in advisories} | {p for a in advisories for p in a.get("requires", {})}
    versions = _versions(packages, sorted(names))
    found: list[dict[str, Any]] = []
    for adv in advisories:
        if _severity_rank(adv["severity"]) < floor:
            continue
        version = versions.get(adv["package"])
        if not _matches(adv["affected"], version, what=adv["package"]):
            continue
        required = {p: versions.get(p) for p in adv.get("requires", {})}
        if any(v is None or not _matches(adv["requires"][p] or ">=0", v, what=p)
               for p, v in required.items()):
            continue
        result: dict[str, Any] = thaw(adv)
        result["installed_version"] = version
        result["affected_spec"] = adv["affected"]
        if required:
            result["requires_installed"] = required
        found.append(result)
    found.sort(key=lambda a: (-SEVERITIES.index(a["severity"]), a["package"], a["id"]))
    return found


def log_version_advisories(
    packages: Mapping[str, str | None] | None = None, *, min_severity: str = "medium"
) -> list[dict[str, Any]]:
    """Log one WARNING per applicable advisory (ERROR for critical) and return them."""
    found = check_version_advisories(packages, min_severity=min_severity)
    for adv in found:
        level = logging.ERROR if adv["severity"] == "critical" else logging.WARNING
        log.log(level, "%s %s (%s, %s): %s Mitigation: %s", adv["package"], adv["installed_version"],
                adv["issue"], adv["severity"], adv["title"], adv["mitigation"])
    return found


def check_version_blocked(package: str, version: str | None = None, *,
                          packages: Mapping[str, str | None] | None = None) -> dict[str, Any] | None:
    """The blocklist entry hit by ``package`` at ``version`` (default: the installed or given
    version), as a copy with ``package`` and ``version`` added, or ``None``."""
    norm = normalize_package_name(package)
    if version is None:
        version = _versions(packages, [norm]).get(norm)
    for entry in _load()["blocklists"].get(norm, ()):
        if _matches(entry["versions"], version, what=norm):
            out: dict[str, Any] = with_legacy_keys(thaw(entry))
            out.update(package=norm, version=version)
            return out
    return None


def check_mlx_version_blocked(version: str | None = None) -> dict[str, Any] | None:
    """:func:`check_version_blocked` for ``mlx``."""
    return check_version_blocked("mlx", version)


def check_mlx_lm_version_blocked(version: str | None = None) -> dict[str, Any] | None:
    """:func:`check_version_blocked` for ``mlx-lm``."""
    return check_version_blocked("mlx-lm", version)


#: The seed spelled advisory fields differently: ``workaround`` for ``mitigation`` and
#: ``reason`` for ``symptom``. Both spellings are offered on every entry we hand out.
LEGACY_FIELD_ALIASES: tuple[tuple[str, str], ...] = (("mitigation", "workaround"), ("symptom", "reason"))


def with_legacy_keys(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``entry`` readable under both spellings (``workaround``/``mitigation``,
    ``reason``/``symptom``) and with ``first_observed`` present (``None`` when unknown)."""
    out = dict(entry)
    for ours, seed in LEGACY_FIELD_ALIASES:
        if ours in out and seed not in out:
            out[seed] = out[ours]
        elif seed in out and ours not in out:
            out[ours] = out[seed]
    out.setdefault("first_observed", None)
    return out


def advisory_for_patch(patch: str) -> Mapping[str, Any] | None:
    """The frozen advisory that names ``patch`` (used to version-gate defensive patches)."""
    return next((a for a in _load()["advisories"] if a.get("patch") == patch), None)


def doctor_section() -> dict[str, Any]:
    """For ``metal-guard doctor``: applicable advisories, blocklist hits and patch status."""
    from metal_guard.knowledge.patches import defensive_patch_status

    return {
        "advisories": [{"id": a["id"], "package": a["package"], "installed_version": a["installed_version"],
                        "severity": a["severity"], "title": a["title"]} for a in check_version_advisories()],
        "blocked": [b for b in (check_version_blocked(p) for p in ("mlx", "mlx-lm")) if b],
        "defensive_patches_installed": defensive_patch_status(),
    }
