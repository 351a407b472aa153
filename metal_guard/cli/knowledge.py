"""Knowledge-base subcommands: ``check-model``, ``advisories``, ``registry validate|list``.

None of them imports MLX or initialises the GPU (the GPU family comes from ``sysctl`` on a Mac,
or from an MLX that is already loaded), so they are safe to run during a panic cooldown.

Exit codes (from the table in :mod:`metal_guard.cli`):

* ``check-model``: 0 no advisory for this model (on this GPU family); 1 an advisory exists
  (the JSON ``policy`` field says whether a load would be refused or only warned).
* ``advisories``: 0 nothing applies; 1 at least one advisory or blocklist entry applies.
* ``registry validate``: 0 valid; 4 invalid or unreadable file.
* ``registry list``: 0.
* usage errors (unknown GPU family, bad ``--package``): 64.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from metal_guard.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, EXIT_WARN, add_command, emit


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "check-model",
                    help="show the known-panic registry advisory for a model (id, local path or HF cache dir)")
    p.add_argument("model_id", metavar="MODEL_ID")
    p.add_argument("--gpu-family", metavar="FAMILY",
                   help="only observations for this GPU family (M1..M5); default: this machine's")
    p.add_argument("--all-families", action="store_true", help="do not filter by GPU family")
    p.set_defaults(func=_check_model)

    p = add_command(subparsers, "advisories",
                    help="list version advisories and blocklist entries for the installed MLX stack")
    p.add_argument("--package", action="append", default=[], metavar="NAME=VERSION",
                   help="check this version instead of the installed one; NAME= means not installed (repeatable)")
    p.add_argument("--min-severity", default="info",
                   choices=("info", "low", "medium", "high", "critical"))
    p.set_defaults(func=_advisories)

    reg = add_command(subparsers, "registry", help="validate or list known-panic registry data")
    common = subparsers._metal_guard_common
    actions = reg.add_subparsers(dest="registry_action", metavar="ACTION", parser_class=type(reg))
    v = actions.add_parser("validate", parents=[common], help="validate a registry or advisories JSON file",
                           description="Validate a registry (or advisories) JSON file: schema + rules.")
    v.add_argument("file", metavar="FILE", type=Path)
    v.add_argument("--kind", choices=("auto", "registry", "advisories"), default="auto",
                   help="what FILE holds (default: detect from its top-level keys)")
    v.set_defaults(func=_validate)
    ls = actions.add_parser("list", parents=[common], help="list the registry's models",
                            description="List the packaged registry's models.")
    ls.add_argument("--tier", choices=("panic", "abort", "degradation"))
    ls.add_argument("--gpu-family", metavar="FAMILY")
    ls.set_defaults(func=_list)
    reg.set_defaults(func=lambda args: _usage(reg))


def _usage(parser: argparse.ArgumentParser) -> int:
    import sys

    parser.print_usage(sys.stderr)
    return EXIT_USAGE


def _err(message: str) -> None:
    import sys

    print(f"metal-guard: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- check-model


def _check_model(args: argparse.Namespace) -> int:
    from metal_guard.knowledge import registry

    family: str | None = None
    if not args.all_families:
        if args.gpu_family:
            family = registry.normalize_gpu_family(args.gpu_family)
            if family is None:
                _err(f"unrecognised GPU family {args.gpu_family!r} (expected M1..M5 or applegpu_gNN)")
                return EXIT_USAGE
        else:
            family = registry.detect_gpu_family()
    full = registry.check_known_panic_model(args.model_id)
    advisory = registry.check_known_panic_model_for_gpu(args.model_id, gpu_family=family) if full else None
    payload: dict[str, Any] = {"model": args.model_id, "gpu_family": family, "known": full is not None,
                               "advisory": advisory}
    if full is not None and advisory is None:
        payload["other_families"] = sorted({f for o in (*full["error_classes"], *full["degradations"])
                                            for f in o["gpu_family"]})
    if advisory is not None:
        payload["policy"] = registry.known_panic_policy(advisory)
    emit(args, payload, _render_model(payload))
    return EXIT_WARN if advisory is not None else EXIT_OK


def _render_model(payload: dict[str, Any]) -> str:
    where = f" on {payload['gpu_family']}" if payload["gpu_family"] else ""
    adv = payload["advisory"]
    if adv is None:
        if payload["known"]:
            return (f"{payload['model']}: no reports{where}; reports exist for "
                    f"{', '.join(payload['other_families']) or 'other setups'} (use --all-families)")
        return f"{payload['model']}: no known reports{where}"
    lines = [f"{adv['model_id']}  [tier: {adv['tier']}]  policy: {payload['policy']}"
             + (f"  (matched as {adv['matched_as']!r})" if adv["matched_as"] != adv["model_id"] else ""),
             f"  {adv['summary']}"]
    for obs in (*adv["error_classes"], *adv["degradations"]):
        fams = ",".join(obs["gpu_family"]) or "any family"
        lines.append(f"  - {obs['type']} ({fams}; {', '.join(obs['hardware']) or 'hardware not stated'})")
        lines.append(f"      signature: {obs['signature']}")
        lines.append(f"      workload:  {obs['workload']}")
        lines.append(f"      source:    {obs['first_seen_via']}")
        lines.append(f"      mitigation: {obs['mitigation']}")
    lines.append(f"  recommendation: {adv['recommendation']}")
    if adv.get("verified_safe_alternative"):
        lines.append(f"  verified safe alternative: {adv['verified_safe_alternative']}")
    if adv["upstream"]:
        lines.append(f"  upstream: {', '.join(adv['upstream'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- advisories


def _advisories(args: argparse.Namespace) -> int:
    from metal_guard.knowledge import advisories as adv_mod

    packages: dict[str, str | None] | None = None
    if args.package:
        packages = adv_mod.installed_versions()
        for item in args.package:
            name, sep, version = item.partition("=")
            if not sep or not name.strip():
                _err(f"--package expects NAME=VERSION (or NAME= for 'not installed'), got {item!r}")
                return EXIT_USAGE
            packages[adv_mod.normalize_package_name(name)] = version.strip() or None
    found = adv_mod.check_version_advisories(packages, min_severity=args.min_severity)
    blocked = [b for b in (adv_mod.check_version_blocked(p, packages=packages) for p in ("mlx", "mlx-lm")) if b]
    payload = {"advisories": found, "blocked": blocked}
    lines = [f"{b['package']} {b['version']} is blocklisted ({b['severity']}): {b['reason']} {b['workaround']}"
             for b in blocked]
    for a in found:
        lines.append(f"[{a['severity']}] {a['package']} {a['installed_version']} ({a['issue']}): {a['title']}")
        lines.append(f"    {a['mitigation']}")
    emit(args, payload, "\n".join(lines) or "no advisories apply")
    return EXIT_WARN if (found or blocked) else EXIT_OK


# --------------------------------------------------------------------------- registry


def _validate(args: argparse.Namespace) -> int:
    from metal_guard.knowledge import validate

    try:
        doc = json.loads(args.file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        payload = {"file": str(args.file), "valid": False, "errors": [f"cannot read JSON: {exc}"]}
        emit(args, payload, f"{args.file}: cannot read JSON: {exc}")
        return EXIT_FAILED
    kind = args.kind
    if kind == "auto":
        kind = "advisories" if isinstance(doc, dict) and "advisories" in doc else "registry"
    errors = validate.validate_advisories(doc) if kind == "advisories" else validate.validate_registry(doc)
    payload = {"file": str(args.file), "kind": kind, "valid": not errors, "errors": errors,
               "validator": "metal_guard.knowledge.validate (stdlib)"}
    text = f"{args.file}: valid {kind} file" if not errors else \
        "\n".join([f"{args.file}: {len(errors)} error(s) in {kind} file", *(f"  {e}" for e in errors)])
    emit(args, payload, text)
    return EXIT_OK if not errors else EXIT_FAILED


def _list(args: argparse.Namespace) -> int:
    from metal_guard.knowledge import registry

    ids: set[str] = set(registry.KNOWN_PANIC_MODELS)
    if args.tier:
        ids &= set(registry.models_by_tier(args.tier))
    if args.gpu_family:
        try:
            ids &= set(registry.models_affecting_gpu_family(args.gpu_family))
        except ValueError as exc:
            _err(str(exc))
            return EXIT_USAGE
    rows = [{"model_id": k, "tier": registry.KNOWN_PANIC_MODELS[k]["tier"],
             "summary": registry.KNOWN_PANIC_MODELS[k]["summary"]} for k in sorted(ids)]
    emit(args, {"models": rows}, "\n".join(f"{r['tier']:<12} {r['model_id']}" for r in rows) or "no models")
    return EXIT_OK
