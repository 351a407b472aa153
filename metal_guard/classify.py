"""The one error/panic classifier.

Every "is this an OOM / a kernel panic / an abort?" question in metal-guard goes through the
table in ``metal_guard/data/error_classes.json``: ordered rows of case-insensitive regular
expressions, first match wins. The table is read, validated and compiled once, on first use
(schema and validation: :mod:`metal_guard.classify_table`); importing this module does no I/O
and compiles nothing. It never imports ``mlx``.

The classifying functions never raise: any input (``str``, ``bytes``, an exception, junk) gives
an :class:`ErrorClass` or ``None``. At most the first and the last :data:`SCAN_HEAD_CHARS` /
:data:`SCAN_TAIL_CHARS` characters of a text are scanned. See ``docs/classifier.md``.
"""

from __future__ import annotations

import logging
import signal as _signal
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from metal_guard.classify_table import SEVERITIES, ErrorTableError, Table, read_table

log = logging.getLogger("metal_guard.classify")

__all__ = [
    "ERROR_CLASS_NAMES",
    "ErrorClass",
    "classify_crash",
    "classify_mlx_error",
    "detect_panic_signature",
    "error_classes",
    "get_error_class",
    "is_kernel_panic_signature",
    "is_metal_oom",
    "is_process_abort_signature",
    "match_error_classes",
]

SCAN_HEAD_CHARS = 1 << 20  # 1 MiB of characters from the start of a text ...
SCAN_TAIL_CHARS = 1 << 20  # ... and 1 MiB from its end; the middle is skipped.
MAX_CHAIN_LINKS = 64  # exceptions visited per classify call (cause/context/groups)
DATA_PACKAGE = "metal_guard"
DATA_PATH = ("data", "error_classes.json")


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


# ----------------------------------------------------------------------------- loading

_lock = threading.Lock()
_cache: Table | ErrorTableError | None = None


def _load() -> Table:
    global _cache
    cached = _cache
    if cached is None:
        with _lock:
            if _cache is None:
                try:
                    _cache = read_table(DATA_PACKAGE, DATA_PATH)
                except ErrorTableError as exc:
                    _cache = exc
            cached = _cache
    if isinstance(cached, ErrorTableError):
        raise cached
    assert cached is not None
    return cached


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


def _table_or_none() -> Table | None:
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
