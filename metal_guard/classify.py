"""The one error/panic classifier.

Every "is this an OOM / a kernel panic / an abort?" question in metal-guard goes through the
table in ``metal_guard/data/error_classes.json``: ordered rows of case-insensitive regular
expressions, first match wins. The table is read, validated and compiled once, on first use;
importing this module does no I/O and compiles nothing. It never imports ``mlx``.

The classifying functions never raise: any input (``str``, ``bytes``, an exception, junk) gives
an :class:`ErrorClass` or ``None``. At most the first and the last :data:`SCAN_HEAD_CHARS` /
:data:`SCAN_TAIL_CHARS` characters of a text are scanned. See ``docs/classifier.md``.
"""

from __future__ import annotations

import logging
import re
import signal as _signal
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

log = logging.getLogger("metal_guard.classify")

__all__ = [
    "ERROR_CLASS_NAMES",
    "KINDS",
    "RECOVERY_HINTS",
    "SCHEMA",
    "SEVERITIES",
    "ErrorClass",
    "ErrorTableError",
    "classify_crash",
    "classify_mlx_error",
    "detect_panic_signature",
    "error_classes",
    "get_error_class",
    "is_kernel_panic_signature",
    "is_metal_oom",
    "is_process_abort_signature",
    "match_error_classes",
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

SCAN_HEAD_CHARS = 1 << 20  # 1 MiB of characters from the start of a text ...
SCAN_TAIL_CHARS = 1 << 20  # ... and 1 MiB from its end; the middle is skipped.
MAX_CHAIN_LINKS = 64  # exceptions visited per classify call (cause/context/groups)
DATA_PACKAGE = "metal_guard"
DATA_PATH = ("data", "error_classes.json")
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


@dataclass(frozen=True)
class ErrorClass:
    """One row of the classifier table (see ``docs/classifier.md`` for the vocabularies)."""

    name: str
    severity: str
    recovery_hint: str
    upstream_refs: tuple[str, ...] = field(repr=False)
    description: str = field(repr=False)
    kind: str
    signature: str | None = field(default=None, repr=False)
    patterns: tuple[str, ...] = field(default=(), repr=False)
    signals: tuple[str, ...] = field(default=(), repr=False)

    @property
    def pattern_str(self) -> str:
        """All patterns as one alternation (seed compatibility)."""
        return "|".join(f"(?:{p})" for p in self.patterns)

    @property
    def severity_rank(self) -> int:
        """0 for ``error``, 1 for ``fatal``, 2 for ``critical``."""
        return SEVERITIES.index(self.severity) if self.severity in SEVERITIES else 0

    @property
    def is_kernel_panic(self) -> bool:
        return self.kind == "kernel_panic"

    @property
    def is_oom(self) -> bool:
        return self.kind == "oom"


class _Table:
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


def _validate(data: Any) -> _Table:
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
    table = _Table(tuple(rows), tuple(regexes))
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
    return _validate(data).rows


# ----------------------------------------------------------------------------- loading

_lock = threading.Lock()
_cache: _Table | ErrorTableError | None = None


def _load() -> _Table:
    global _cache
    cached = _cache
    if cached is None:
        with _lock:
            if _cache is None:
                try:
                    _cache = _read_packaged()
                except ErrorTableError as exc:
                    _cache = exc
            cached = _cache
    if isinstance(cached, ErrorTableError):
        raise cached
    assert cached is not None
    return cached


def _read_packaged() -> _Table:
    import json
    from importlib import resources

    try:
        res = resources.files(DATA_PACKAGE)
        for part in DATA_PATH:
            res = res / part
        data = json.loads(res.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ErrorTableError(f"error_classes.json: cannot be read: {exc}") from exc
    return _validate(data)


def error_classes() -> tuple[ErrorClass, ...]:
    """The packaged classes in priority order (read, validated and compiled once, then cached).

    Raises :class:`ErrorTableError` if the packaged data file is broken.
    """
    return _load().rows


def get_error_class(name: str) -> ErrorClass:
    """The class called ``name``; ``KeyError`` listing the known names otherwise."""
    table = _load()
    try:
        return table.by_name[name]
    except (KeyError, TypeError):
        raise KeyError(f"unknown error class {name!r}; known: {sorted(table.by_name)}") from None


ERROR_CLASS_NAMES: frozenset[str]  # provided lazily by __getattr__ (PEP 562)

if not TYPE_CHECKING:  # hidden from mypy so that typos in other attribute names still fail

    def __getattr__(name: str) -> Any:
        if name == "ERROR_CLASS_NAMES":  # computed from the data file on first access
            return frozenset(_load().by_name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_reported = False


def _table_or_none() -> _Table | None:
    """The table, or ``None`` (logged once) when the packaged data file is broken."""
    global _reported
    try:
        return _load()
    except ErrorTableError as exc:
        if not _reported:
            _reported = True
            log.error("error classifier disabled, every input classifies as None: %s", exc)
        return None


# ----------------------------------------------------------------------------- text extraction


def _clip(text: str) -> str:
    if len(text) <= SCAN_HEAD_CHARS + SCAN_TAIL_CHARS:
        return text
    return text[:SCAN_HEAD_CHARS] + "\n\n" + text[-SCAN_TAIL_CHARS:]


def _decode(data: bytes | bytearray | memoryview) -> str:
    raw = bytes(data)
    if len(raw) <= SCAN_HEAD_CHARS + SCAN_TAIL_CHARS:
        return raw.decode("utf-8", errors="replace")
    head = raw[:SCAN_HEAD_CHARS].decode("utf-8", errors="replace")
    return head + "\n\n" + raw[-SCAN_TAIL_CHARS:].decode("utf-8", errors="replace")


def _safe_str(obj: object) -> str:
    for render in (str, repr):
        try:
            text = render(obj)
            if isinstance(text, str):
                return text
        except Exception:
            continue
    return ""


def _exc_text(exc: BaseException) -> str:
    text = _safe_str(exc)
    try:
        notes = getattr(exc, "__notes__", None)
        if isinstance(notes, list | tuple):
            text += "".join("\n" + n for n in notes[:32] if isinstance(n, str))
    except Exception:
        pass
    return _clip(text)


def _links(obj: object) -> Iterator[tuple[ErrorClass | None, str]]:
    """Yield ``(pre_classified, text)`` per link: one for text, the chain for exceptions."""
    if obj is None:
        return
    if isinstance(obj, str):
        yield None, _clip(obj)
        return
    if isinstance(obj, bytes | bytearray | memoryview):
        yield None, _decode(obj)
        return
    if not isinstance(obj, BaseException):
        yield None, _clip(_safe_str(obj))
        return
    queue: deque[BaseException] = deque([obj])
    seen: set[int] = set()
    while queue and len(seen) < MAX_CHAIN_LINKS:
        exc = queue.popleft()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        try:
            pre = getattr(exc, "error_class", None)
        except Exception:
            pre = None
        yield (pre if isinstance(pre, ErrorClass) else None), _exc_text(exc)
        nexts: list[object] = []
        for attr in ("__cause__", "__context__", "exceptions"):
            try:
                value = getattr(exc, attr, None)
            except Exception:
                continue
            if attr == "exceptions":
                if isinstance(exc, BaseExceptionGroup) and isinstance(value, tuple | list):
                    nexts.extend(value)
            else:
                nexts.append(value)
        queue.extend(n for n in nexts if isinstance(n, BaseException))


# ----------------------------------------------------------------------------- public API


def classify_mlx_error(text_or_exception: object) -> ErrorClass | None:
    """Classify an MLX/Metal failure; ``None`` when nothing in the table matches.

    Accepts ``str``, ``bytes`` or an exception. For an exception, each link of the
    ``__cause__`` / ``__context__`` chain (and exception-group members) is tried in turn; the
    first link that carries an ``error_class`` or whose text matches decides. Never raises.
    """
    try:
        table = _table_or_none()
        if table is None:
            return None
        for pre, text in _links(text_or_exception):
            if pre is not None:
                return pre
            found = table.first(text)
            if found is not None:
                return found
    except Exception:  # the classifier runs inside except-blocks: never mask the real error
        log.debug("classify_mlx_error failed", exc_info=True)
    return None


def match_error_classes(text_or_exception: object) -> tuple[ErrorClass, ...]:
    """Every class whose patterns match anywhere in the input, in priority order."""
    try:
        table = _table_or_none()
        if table is None:
            return ()
        found: dict[str, ErrorClass] = {}
        for pre, text in _links(text_or_exception):
            if pre is not None:
                found.setdefault(pre.name, pre)
            for row in table.all(text):
                found.setdefault(row.name, row)
        order = {row.name: i for i, row in enumerate(table.rows)}
        return tuple(sorted(found.values(), key=lambda r: order.get(r.name, len(order))))
    except Exception:
        log.debug("match_error_classes failed", exc_info=True)
        return ()


def is_metal_oom(exc_or_text: object) -> bool:
    """True for memory exhaustion: command-buffer OOM, allocation failure, buffer too large.

    False for kernel panics, the interactivity watchdog and the descriptor-count limit.
    """
    found = classify_mlx_error(exc_or_text)
    return found is not None and found.kind == "oom"


def is_kernel_panic_signature(text: object) -> bool:
    """True if the text carries a known IOGPU kernel-panic signature."""
    found = classify_mlx_error(text)
    return found is not None and found.kind == "kernel_panic"


def is_process_abort_signature(text: object) -> bool:
    """True if the text shows the process was aborted or killed (and is not a kernel panic)."""
    kinds = {c.kind for c in match_error_classes(text)}
    return "process_abort" in kinds and "kernel_panic" not in kinds


def detect_panic_signature(text: object) -> tuple[str, str] | tuple[None, None]:
    """``(signature, explanation)`` of the first signature-bearing class that matches.

    Signatures include the seed's ``prepare_count_underflow``, ``pending_memory_set``,
    ``ctxstore_timeout`` and ``metal_oom``; ``(None, None)`` when nothing matches.
    """
    for cls in match_error_classes(text):
        if cls.signature:
            return cls.signature, cls.description
    return None, None


def _exit_signal(exitcode: object) -> str | None:
    if isinstance(exitcode, bool) or not isinstance(exitcode, int):
        return None
    number = -exitcode if exitcode < 0 else exitcode - 128 if 128 < exitcode < 192 else 0
    if number <= 0:
        return None
    try:
        return _signal.Signals(number).name
    except ValueError:
        return None


def classify_crash(exitcode: int | None, detail: str = "") -> ErrorClass | None:
    """Classify a dead worker from its last words, else from its exit status.

    The text wins when it matches. Otherwise a signal exit (negative ``exitcode``, or the shell
    form ``128 + N``) maps through the table's ``signals`` (SIGABRT -> ``process_abort``,
    SIGSEGV/SIGBUS/... -> ``worker_segfault``, SIGKILL -> ``worker_killed``); any other nonzero
    status gives ``worker_exit``; ``0`` / ``None`` give ``None``. Never raises.
    """
    try:
        found = classify_mlx_error(detail) if detail else None
        if found is not None:
            return found
        table = _table_or_none()
        if table is None or exitcode is None or exitcode == 0:
            return None
        sig = _exit_signal(exitcode)
        if sig is not None and sig in table.by_signal:
            return table.by_signal[sig]
        return table.by_name.get("worker_exit")
    except Exception:
        log.debug("classify_crash failed", exc_info=True)
        return None
