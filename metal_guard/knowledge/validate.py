"""Validation of the knowledge-base data files (registry, advisories), stdlib only.

Two layers:

* :func:`schema_errors` checks a document against a JSON Schema. It implements exactly the
  keywords our two schemas use (``type``, ``enum``, ``required``, ``properties``,
  ``additionalProperties``, ``propertyNames``, ``items``, ``uniqueItems``, ``minLength``,
  ``minimum``, ``pattern``, local ``$ref``) with JSON Schema semantics, so ``metal-guard
  registry validate`` needs no third-party package. A schema keyword it does not know raises
  ``ValueError`` instead of being silently ignored. The test suite runs ``jsonschema`` on the
  same documents and asserts that both agree.
* :func:`registry_rule_errors` / :func:`advisory_rule_errors` check what a schema cannot
  express: the error-class vocabulary shared with :mod:`metal_guard.classify`, the tier rule,
  date order, duplicate ids, PEP 440 specifiers, fix versions that were really released, and
  blocklists whose advice contradicts another advisory.

Every function returns a list of ``"<json-path>: message"`` strings; an empty list means valid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

__all__ = [
    "SUPPORTED_KEYWORDS",
    "TIER_ORDER",
    "advisory_rule_errors",
    "load_schema",
    "registry_rule_errors",
    "schema_errors",
    "validate_advisories",
    "validate_registry",
]

#: Keywords understood by :func:`schema_errors` (annotations are accepted and ignored).
SUPPORTED_KEYWORDS = frozenset({
    "type", "enum", "required", "properties", "additionalProperties", "propertyNames",
    "items", "uniqueItems", "minLength", "minimum", "pattern", "$ref", "$defs",
    "$schema", "$id", "title", "description", "$comment",
})
#: Registry tiers, mildest first.
TIER_ORDER = ("degradation", "abort", "panic")
#: The tier an error-class *kind* implies at least (see docs/knowledge.md).
_KIND_MIN_TIER = {"kernel_panic": "panic", "process_abort": "abort", "process_exit": "abort"}
_SEVERITIES = ("info", "low", "medium", "high", "critical")

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "null": (type(None),), "number": (int, float), "integer": (int,),
}


@cache
def load_schema(name: str) -> dict[str, Any]:
    """A packaged schema (``registry_schema.json`` or ``advisories_schema.json``)."""
    from importlib import resources

    text = resources.files("metal_guard").joinpath("data", name).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def _is_type(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name in ("number", "integer"):
        return False
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _JSON_TYPES[name])


def _resolve(root: Mapping[str, Any], ref: str) -> Mapping[str, Any]:
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref values are supported, not {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node  # type: ignore[no-any-return]


def schema_errors(doc: Any, schema: Mapping[str, Any]) -> list[str]:
    """Errors of ``doc`` against ``schema`` (the supported subset of JSON Schema 2020-12)."""
    errors: list[str] = []
    _walk(doc, schema, schema, "$", errors)
    return errors


def _walk(value: Any, node: Mapping[str, Any], root: Mapping[str, Any], path: str,
          errors: list[str]) -> None:
    unknown = set(node) - SUPPORTED_KEYWORDS
    if unknown:
        raise ValueError(f"schema keyword(s) not supported by the built-in validator: {sorted(unknown)}")
    if "$ref" in node:
        _walk(value, _resolve(root, node["$ref"]), root, path, errors)
    if "type" in node:
        types = node["type"] if isinstance(node["type"], list) else [node["type"]]
        if not any(_is_type(value, t) for t in types):
            errors.append(f"{path}: expected {' or '.join(types)}, got {type(value).__name__}")
            return
    if "enum" in node and value not in node["enum"]:
        errors.append(f"{path}: {value!r} is not one of {node['enum']}")
    if isinstance(value, str):
        if len(value) < node.get("minLength", 0):
            errors.append(f"{path}: must not be empty")
        if "pattern" in node and not re.search(node["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {node['pattern']!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and \
            "minimum" in node and value < node["minimum"]:
        errors.append(f"{path}: {value} is less than {node['minimum']}")
    if isinstance(value, list):
        if node.get("uniqueItems"):
            seen: list[str] = []
            for item in value:
                key = json.dumps(item, sort_keys=True)
                if key in seen:
                    errors.append(f"{path}: duplicate item {item!r}")
                seen.append(key)
        if "items" in node:
            for i, item in enumerate(value):
                _walk(item, node["items"], root, f"{path}[{i}]", errors)
    if isinstance(value, dict):
        for key in node.get("required", ()):
            if key not in value:
                errors.append(f"{path}: missing required field {key!r}")
        props = node.get("properties", {})
        extra = node.get("additionalProperties", True)
        names = node.get("propertyNames")
        for key, item in value.items():
            sub = f"{path}.{key}"
            if names is not None:
                _walk(key, names, root, f"{path} key {key!r}", errors)
            if key in props:
                _walk(item, props[key], root, sub, errors)
            elif extra is False:
                errors.append(f"{path}: unknown field {key!r}")
            elif isinstance(extra, Mapping):
                _walk(item, extra, root, sub, errors)


# --------------------------------------------------------------------------- registry rules


def _class_kinds() -> dict[str, str]:
    """Error-class name -> kind, from the one classifier table."""
    from metal_guard.classify import error_classes

    return {c.name: c.kind for c in error_classes()}


def registry_rule_errors(doc: Mapping[str, Any], class_kinds: Mapping[str, str] | None = None) -> list[str]:
    """Cross-field rules of a registry document that already passed the schema."""
    kinds = dict(_class_kinds() if class_kinds is None else class_kinds)
    errors: list[str] = []
    models: Mapping[str, Any] = doc.get("models", {})
    seen: dict[str, str] = {}
    for key, entry in models.items():
        path = f"$.models.{key}"
        for ident in (key, *entry.get("aliases", ())):
            low = ident.lower()
            if low in seen:
                errors.append(f"{path}: id {ident!r} is already used by {seen[low]!r} (ids are case-insensitive)")
            seen[low] = key
        floor = "degradation"
        for i, obs in enumerate(entry.get("error_classes", ())):
            kind = kinds.get(obs["type"])
            if kind is None:
                errors.append(f"{path}.error_classes[{i}].type: {obs['type']!r} is not a classifier "
                              f"class (known: {', '.join(sorted(kinds))})")
                continue
            floor = max(floor, _KIND_MIN_TIER.get(kind, "degradation"), key=TIER_ORDER.index)
        tier = entry["tier"]
        if TIER_ORDER.index(tier) < TIER_ORDER.index(floor):
            errors.append(f"{path}.tier: {tier!r} is milder than its error classes imply ({floor!r})")
        has_panic = any(kinds.get(o["type"]) == "kernel_panic" for o in entry.get("error_classes", ()))
        if tier == "panic" and not has_panic:
            errors.append(f"{path}.tier: 'panic' needs at least one kernel_panic error class")
        if not entry.get("error_classes") and not entry.get("degradations"):
            errors.append(f"{path}: needs at least one error_classes or degradations item")
        if entry.get("degradations") and tier != "degradation" and not entry.get("error_classes"):
            errors.append(f"{path}.tier: an entry with only degradations must be tier 'degradation'")
        if entry["first_observed"] > entry["last_observed"]:
            errors.append(f"{path}: first_observed {entry['first_observed']} is after last_observed "
                          f"{entry['last_observed']}")
        if not entry.get("reproductions") and not entry.get("upstream") and not entry.get("community"):
            errors.append(f"{path}: no evidence: add a reproduction, an upstream issue or a community link")
    for key, entry in models.items():
        alt = entry.get("verified_safe_alternative")
        if alt and alt.lower() in seen:
            errors.append(f"$.models.{key}.verified_safe_alternative: {alt!r} is itself in the registry")
    for name, work in doc.get("workloads", {}).items():
        cls = work.get("error_class")
        if cls is not None and cls not in kinds:
            errors.append(f"$.workloads.{name}.error_class: {cls!r} is not a classifier class")
    return errors


# --------------------------------------------------------------------------- advisory rules


def advisory_rule_errors(doc: Mapping[str, Any], class_names: Iterable[str] | None = None) -> list[str]:
    """Cross-field rules of an advisories document that already passed the schema."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    names = set(_class_kinds() if class_names is None else class_names)
    errors: list[str] = []
    releases = {pkg: [Version(v) for v in vs] for pkg, vs in doc.get("releases", {}).items()}

    def spec(text: str, where: str) -> SpecifierSet | None:
        try:
            return SpecifierSet(text)
        except InvalidSpecifier:
            errors.append(f"{where}: {text!r} is not a valid PEP 440 specifier set")
            return None

    ids: set[str] = set()
    parsed: list[tuple[Mapping[str, Any], SpecifierSet]] = []
    for i, adv in enumerate(doc.get("advisories", ())):
        where = f"$.advisories[{i}]"
        if adv["id"] in ids:
            errors.append(f"{where}.id: duplicate id {adv['id']!r}")
        ids.add(adv["id"])
        affected = spec(adv["affected"], f"{where}.affected")
        for pkg, req in adv.get("requires", {}).items():
            spec(req, f"{where}.requires.{pkg}")
        if adv.get("error_class") is not None and adv["error_class"] not in names:
            errors.append(f"{where}.error_class: {adv['error_class']!r} is not a classifier class")
        fixed = adv.get("fixed_in")
        if affected is not None:
            parsed.append((adv, affected))
            if fixed is not None:
                try:
                    if affected.contains(Version(fixed), prereleases=True):
                        errors.append(f"{where}.fixed_in: {fixed} is inside the affected range {adv['affected']!r}")
                except InvalidVersion:
                    errors.append(f"{where}.fixed_in: {fixed!r} is not a PEP 440 version")
        known = releases.get(adv["package"])
        if fixed is not None and known is not None and Version(fixed) not in known:
            errors.append(f"{where}.fixed_in: {adv['package']} {fixed} is not a known release")
    for pkg, entries in doc.get("blocklists", {}).items():
        for i, block in enumerate(entries):
            where = f"$.blocklists.{pkg}[{i}]"
            blocked = spec(block["versions"], f"{where}.versions")
            target = spec(block["upgrade_to"], f"{where}.upgrade_to")
            if block.get("error_class") is not None and block["error_class"] not in names:
                errors.append(f"{where}.error_class: {block['error_class']!r} is not a classifier class")
            known = releases.get(pkg)
            if blocked is None or target is None or known is None:
                continue
            candidates = [v for v in known if target.contains(v, prereleases=True)]
            if not candidates:
                errors.append(f"{where}.upgrade_to: no known {pkg} release satisfies {block['upgrade_to']!r}")
                continue
            if any(blocked.contains(v, prereleases=True) for v in candidates):
                errors.append(f"{where}.upgrade_to: {block['upgrade_to']!r} includes a blocked version")
            clean = [v for v in candidates if not _serious_hits(pkg, v, parsed)]
            if not clean:
                errors.append(f"{where}.upgrade_to: every release in {block['upgrade_to']!r} has a high or "
                              "critical advisory (the advice contradicts the advisories)")
    return errors


def _serious_hits(pkg: str, version: Any, parsed: list[tuple[Mapping[str, Any], Any]]) -> bool:
    for adv, affected in parsed:
        if adv["package"] != pkg or adv.get("requires") or adv.get("scope"):
            continue  # conditional advisories do not make a release unusable for everyone
        if _SEVERITIES.index(adv["severity"]) >= _SEVERITIES.index("high") and \
                affected.contains(version, prereleases=True):
            return True
    return False


# --------------------------------------------------------------------------- entry points


def validate_registry(doc: Any, class_kinds: Mapping[str, str] | None = None) -> list[str]:
    """All errors of a registry document: schema first, then (if the schema passed) the rules."""
    errors = schema_errors(doc, load_schema("registry_schema.json"))
    return errors or registry_rule_errors(doc, class_kinds)


def validate_advisories(doc: Any, class_names: Iterable[str] | None = None) -> list[str]:
    """All errors of an advisories document: schema first, then (if the schema passed) the rules."""
    errors = schema_errors(doc, load_schema("advisories_schema.json"))
    return errors or advisory_rule_errors(doc, class_names)
