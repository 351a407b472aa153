"""The classifier's data table: its schema, validation and compilation.

``metal_guard/data/error_classes.json`` holds ordered rows of case-insensitive regular
expressions. This module checks a parsed file against :data:`SCHEMA` (interpreted here, so no
``jsonschema`` is needed at run time) and against what a schema cannot say, then compiles the
patterns into a :class:`Table`. Importing it compiles nothing; :mod:`metal_guard.classify`
reads the packaged table once, on first use, and owns the public classification functions.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metal_guard.classify import ErrorClass

__all__ = [
    "KINDS",
    "RECOVERY_HINTS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SEVERITIES",
    "ErrorTableError",
    "Table",
    "build_table",
    "read_table",
    "validate_error_table",
]

#: What kind of failure a class describes.
KINDS = ("kernel_panic", "process_abort", "process_exit", "gpu_error", "oom", "resource")
#: Blast radius, mildest first: ``error`` (the operation failed, the process can go on),
#: ``fatal`` (the process is dead or its GPU state is untrustworthy), ``critical`` (the
#: machine went down).
SEVERITIES = ("error", "fatal", "critical")
#: What the caller should do next.
RECOVERY_HINTS = (
    "wait_lockout",
    "respawn_now",
    "force_reload",
    "reduce_and_retry",
    "retry_later",
    "unknown",
)

SCHEMA_VERSION = 1
_REQUIRED_NAMES = ("worker_exit",)  # referenced by code (classify_crash)

_NAME_RE = r"^[a-z][a-z0-9_]*$"
_REF_RE = r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+#[0-9]+$"


def _strings(pattern: str = r"\S") -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string", "pattern": pattern}}


_ROW_KEYS = ("name", "kind", "severity", "recovery_hint", "patterns", "upstream_refs")
#: JSON Schema (draft 2020-12) of the data file; :func:`validate_error_table` interprets it
#: directly (no ``jsonschema`` needed at run time) and then checks what a schema cannot say:
#: unique names, signatures and signals, compilable patterns, kernel panics first, and that
#: every row's ``examples`` classify to that row.
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema_version", "classes"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "description": {"type": "string"},
        "classes": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": [*_ROW_KEYS, "description"],
                "properties": {
                    "name": {"type": "string", "pattern": _NAME_RE},
                    "kind": {"enum": list(KINDS)},
                    "severity": {"enum": list(SEVERITIES)},
                    "recovery_hint": {"enum": list(RECOVERY_HINTS)},
                    "signature": {"type": "string", "pattern": _NAME_RE},
                    "signals": _strings(r"^SIG[A-Z0-9]+$"),
                    "patterns": _strings(),
                    "upstream_refs": _strings(_REF_RE),
                    "description": {"type": "string", "pattern": r"\S"},
                    "examples": _strings(),
                },
            },
        },
    },
}


class ErrorTableError(ValueError):
    """The error-class data file is malformed; the message names the offending field."""


class Table:
    """Rows in priority order, each with its compiled patterns (see :func:`_compile`)."""

    def __init__(
        self, rows: tuple[ErrorClass, ...], regexes: tuple[tuple[re.Pattern[str], ...], ...]
    ):
        self.rows = rows
        self.pairs = tuple((row, rxs) for row, rxs in zip(rows, regexes, strict=True) if rxs)
        self.by_name = {r.name: r for r in rows}
        self.by_signal = {s: r for r in rows for s in r.signals}

    def first(self, text: str) -> ErrorClass | None:
        low = text.lower()
        for row, rxs in self.pairs:
            if any(rx.search(low) for rx in rxs):
                return row
        return None

    def all(self, text: str) -> list[ErrorClass]:
        low = text.lower()
        return [row for row, rxs in self.pairs if any(rx.search(low) for rx in rxs)]


# ----------------------------------------------------------------------------- validation


def _fail(where: str, msg: str) -> ErrorTableError:
    return ErrorTableError(f"error_classes.json: {where or 'top level'}: {msg}")


_TYPES = {"object": dict, "array": list, "string": str}


def _check(value: Any, schema: dict[str, Any], where: str) -> None:
    """Interpret the subset of JSON Schema that :data:`SCHEMA` uses."""
    if "const" in schema and value != schema["const"]:
        raise _fail(where, f"expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        raise _fail(where, f"{value!r} is not one of {schema['enum']}")
    kind = schema.get("type")
    if kind is None:
        return
    if not isinstance(value, _TYPES[kind]):
        raise _fail(
            where, f"expected {'a' if kind == 'string' else 'an'} {kind}, got {value!r:.60}"
        )
    if kind == "string" and "pattern" in schema and not re.search(schema["pattern"], value):
        raise _fail(where, f"{value!r:.60} does not match {schema['pattern']}")
    if kind == "array":
        if len(value) < schema.get("minItems", 0):
            raise _fail(where, f"expected at least {schema['minItems']} item(s)")
        for i, item in enumerate(value):
            name = item.get("name") if isinstance(item, dict) else None
            _check(item, schema["items"], f"{where}[{i}]" + (f" ({name!r})" if name else ""))
    if kind == "object":
        missing = [k for k in schema.get("required", ()) if k not in value]
        if missing:
            raise _fail(where, f"missing key(s) {missing}")
        unknown = sorted(set(value) - set(schema["properties"]))
        if unknown and schema.get("additionalProperties") is False:
            raise _fail(where, f"unknown key(s) {unknown}")
        for key, item in value.items():
            if key in schema["properties"]:
                _check(item, schema["properties"][key], f"{where}.{key}" if where else key)


def _lower_pattern(pattern: str) -> str:
    """Lowercase a pattern's literals, keeping every escape (``\\S``, ``\\D`` ...) intact."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        step = 2 if pattern[i] == "\\" else 1
        chunk = pattern[i : i + step]
        out.append(chunk if step == 2 else chunk.lower())
        i += step
    return "".join(out)


def _compile(patterns: list[str], where: str) -> tuple[re.Pattern[str], ...]:
    """Compile each pattern on its own, lowercased, without IGNORECASE.

    Texts are lowercased once and searched case-sensitively: that keeps CPython's fast
    literal-prefix search, which IGNORECASE and one big alternation both lose (about 10x).
    """
    compiled = []
    for i, p in enumerate(patterns):
        try:
            re.compile(p)
            compiled.append(re.compile(_lower_pattern(p)))
        except re.error as exc:
            raise _fail(f"{where}.patterns[{i}]", f"invalid regular expression {p!r}: {exc}")
    return tuple(compiled)


def build_table(data: Any) -> Table:
    """Validate a parsed data file and compile it into a :class:`Table`."""
    from metal_guard.classify import ErrorClass  # the row type lives with the classifier

    _check(data, SCHEMA, "")
    rows: list[ErrorClass] = []
    regexes: list[tuple[re.Pattern[str], ...]] = []
    seen: dict[str, str] = {}  # "name:x" / "signature:x" / "signal:x" -> owning row
    for i, row in enumerate(data["classes"]):
        where = f"classes[{i}] ({row['name']!r})"
        claims = [f"name:{row['name']}", *(f"signal:{s}" for s in row.get("signals", ()))]
        if "signature" in row:
            claims.append(f"signature:{row['signature']}")
        for claim in claims:
            if claim in seen:
                raise _fail(where, f"duplicate {claim.replace(':', ' ')} (also in {seen[claim]!r})")
            seen[claim] = row["name"]
        if row["kind"] == "kernel_panic" and rows and not rows[-1].is_kernel_panic:
            raise _fail(where, "kernel_panic rows must come before every other row")
        regexes.append(_compile(row["patterns"], where))
        rows.append(
            ErrorClass(
                name=row["name"],
                severity=row["severity"],
                recovery_hint=row["recovery_hint"],
                upstream_refs=tuple(row["upstream_refs"]),
                description=row["description"].strip(),
                kind=row["kind"],
                signature=row.get("signature"),
                patterns=tuple(row["patterns"]),
                signals=tuple(row.get("signals", ())),
            )
        )
    for name in _REQUIRED_NAMES:
        if f"name:{name}" not in seen:
            raise _fail("classes", f"required class {name!r} is missing")
    table = Table(tuple(rows), tuple(regexes))
    for i, row in enumerate(data["classes"]):
        for ex in row.get("examples", ()):
            got = table.first(ex)
            if got is not rows[i]:
                raise _fail(
                    f"classes[{i}] ({row['name']!r}).examples",
                    f"{ex[:80]!r} classifies as {got.name if got else None!r}, not as this row",
                )
    return table


def validate_error_table(data: Any) -> tuple[ErrorClass, ...]:
    """Validate a parsed data file; return its classes in priority order.

    Raises :class:`ErrorTableError` naming the first offending field.
    """
    return build_table(data).rows


# ----------------------------------------------------------------------------- loading


def read_table(package: str, path: tuple[str, ...]) -> Table:
    """Read, validate and compile the data file at ``path`` (parts) inside ``package``."""
    import json
    from importlib import resources

    try:
        res = resources.files(package)
        for part in path:
            res = res / part
        data = json.loads(res.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ErrorTableError(f"error_classes.json: cannot be read: {exc}") from exc
    return build_table(data)
