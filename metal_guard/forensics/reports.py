"""macOS panic and crash reports: find them, read them safely, parse them, classify them.

Formats (see ``docs/forensics.md``):

* ``panic-full-*.panic`` (and ``.ips`` files whose header says ``bug_type`` 210): a one-line
  JSON header, then a JSON body whose panic text is ``panicString`` (Apple Silicon) or
  ``macOSPanicString`` (Intel/T2);
* legacy plain-text panics (``*** Panic Report ***`` / ``panic(cpu ...``);
* ``.ips`` process-crash reports (``bug_type`` 309): exception type and signal, the triggering
  thread's dispatch queue (``com.Metal.CompletionQueueDispatch`` for MLX's completion-handler
  abort), ``asi`` messages and any ``libc++abi`` line; ``gpuEvent`` reports (``bug_type`` 284);
  and the pasted text form (``Exception Type: ...``).

Every report goes through the one classifier (:mod:`metal_guard.classify`); unrelated panics
are returned with ``is_gpu=False``. Scanning never follows a symlink out of a reports
directory, opens only regular files, reads at most :data:`MAX_READ_BYTES` per file and drops
old files by the date in their name (or their mtime) before reading anything. Parsers never
raise: junk, truncated or binary input gives ``None`` (with a debug log).
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from metal_guard.clock import now_ts as _now_ts
from metal_guard.forensics.records import KERNEL_PANIC, PanicRecord
from metal_guard.forensics.scancache import ScanCache, fingerprint

if TYPE_CHECKING:  # the parsers are imported on first use: the gate often needs none
    from metal_guard.forensics.formats import ParsedReport

log = logging.getLogger("metal_guard.forensics.reports")

__all__ = [
    "MAX_READ_BYTES",
    "ScanResult",
    "classify_parsed",
    "iter_report_candidates",
    "parse_panic_reports",
    "parse_report_bytes",
    "parse_report_file",
    "read_report_bytes",
    "scan_reports",
]

#: Bytes read from one report at most (the panic text sits near the top of the body).
MAX_READ_BYTES = 2 * 1024 * 1024
#: Characters of a report's panic / crash text given to the classifier.
MAX_CLASSIFY_CHARS = 64 * 1024
#: Newest candidate files parsed per kind and scan; older ones are counted as ``capped``.
MAX_PANIC_FILES = 200
MAX_CRASH_FILES = 500
#: File names carry local time; allow this much slack when comparing them with UTC epochs.
NAME_DATE_SLACK_SEC = 26 * 3600
#: Reports dated further than this after "now" are ignored (clock trouble, junk, or a test clock).
FUTURE_TOLERANCE_SEC = 15 * 60

_SUFFIXES = (".panic", ".ips", ".crash")
_NAME_DATE_RE = re.compile(r"[12]\d{3}-[01]\d-[0-3]\d-[0-2]\d[0-5]\d[0-6]\d")
_PANIC_NAME_RE = re.compile(r"^(?:panic|kernel)", re.IGNORECASE)


@dataclass(frozen=True)
class Candidate:
    """A report file found by a directory scan, before it is read."""

    path: str
    name: str
    root: str
    sort_ts: float
    panic_like: bool
    fingerprint: str = ""


@dataclass
class ScanResult:
    """Outcome of :func:`scan_reports`.

    ``errors`` lists conditions that make a scan untrustworthy (a reports directory that
    exists but cannot be listed, a recent panic report that cannot be read): the gate turns
    them into exit code 3. ``skipped`` counts junk/unreadable files, ``capped`` the candidates
    left unread because of :data:`MAX_PANIC_FILES` / :data:`MAX_CRASH_FILES`.
    """

    records: list[PanicRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    candidates: int = 0
    skipped: int = 0
    capped: int = 0

    @property
    def panics(self) -> list[PanicRecord]:
        return [r for r in self.records if r.kind == KERNEL_PANIC]

    @property
    def crashes(self) -> list[PanicRecord]:
        return [r for r in self.records if r.kind != KERNEL_PANIC]


# --------------------------------------------------------------------------- names and dates


def name_timestamp(name: str) -> float | None:
    """Epoch of the ``YYYY-MM-DD-HHMMSS`` stamp in a report file name (local time), if any."""
    match = _NAME_DATE_RE.search(name)
    if not match:
        return None
    try:
        t = match.group(0)  # YYYY-MM-DD-HHMMSS, local time like the name (no strptime import)
        return datetime(int(t[0:4]), int(t[5:7]), int(t[8:10]), int(t[11:13]), int(t[13:15]),
                        int(t[15:17])).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def _cutoff_stamp(since: float | None) -> str:
    """The local-time ``YYYY-MM-DD-HHMMSS`` stamp of ``since - slack`` ("" = no cut-off).

    Name stamps sort like the times they encode, so the pre-filter is a string comparison.
    """
    if since is None:
        return ""
    try:
        return datetime.fromtimestamp(since - NAME_DATE_SLACK_SEC).strftime("%Y-%m-%d-%H%M%S")
    except (OverflowError, OSError, ValueError):
        return ""


def _within(path: str, roots: Sequence[str]) -> bool:
    for root in roots:
        try:
            if os.path.commonpath([path, root]) == root:
                return True
        except ValueError:
            continue
    return False


def iter_report_candidates(
    dirs: Iterable[Path | str],
    *,
    panic_since_ts: float | None = None,
    crash_since_ts: float | None = None,
    kinds: frozenset[str] = frozenset({"panic", "crash"}),
    result: ScanResult | None = None,
) -> list[Candidate]:
    """List report files in ``dirs`` (not recursive) that may be newer than the cut-offs.

    Nothing is read here: a file is dropped when the date in its name (or, without one, its
    mtime) is older than the cut-off minus :data:`NAME_DATE_SLACK_SEC`. Reports are written
    after the event they describe, so this never drops a report of a recent event. A symlink
    is kept only when it resolves inside one of ``dirs``. Only the survivors are ``lstat``'d,
    so a directory of thousands of old reports costs one ``listdir`` and a string compare each.
    """
    result = result if result is not None else ScanResult()
    dir_list = [str(Path(d).expanduser()) for d in dirs]
    real_roots = [os.path.realpath(d) for d in dir_list]
    cut = {True: _cutoff_stamp(panic_since_ts), False: _cutoff_stamp(crash_since_ts)}
    since = {True: panic_since_ts, False: crash_since_ts}
    want = {True: "panic" in kinds, False: "crash" in kinds}
    search = _NAME_DATE_RE.search
    out: list[Candidate] = []
    seen: set[str] = set()
    for directory in dir_list:
        result.dirs.append(directory)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            result.errors.append(f"reports path {directory} is not a directory")
            continue
        except OSError as exc:
            result.errors.append(f"cannot list reports directory {directory}: {exc.strerror or exc}")
            continue
        for name in names:
            low = name if name.endswith(_SUFFIXES) else name.lower()
            if not low.endswith(_SUFFIXES) or name.startswith("."):
                continue
            panic_like = low.endswith(".panic") or _PANIC_NAME_RE.match(name) is not None
            if not want[panic_like]:
                continue
            match = search(name)
            if match is not None and match.group(0) < cut[panic_like]:
                continue
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
                ts = name_timestamp(name) if match is not None else None
                if ts is None:
                    ts = st.st_mtime
                    cutoff = since[panic_like]
                    if cutoff is not None and ts < cutoff - NAME_DATE_SLACK_SEC:
                        continue
                if stat.S_ISLNK(st.st_mode):
                    target = os.path.realpath(path)
                    if not _within(target, real_roots):
                        log.debug("skipping %s: symlink leads outside the reports dirs", path)
                        result.skipped += 1
                        continue
                    path = target
                    st = os.stat(path)
            except OSError as exc:
                log.debug("skipping %s: %s", path, exc)
                result.skipped += 1
                continue
            key = os.path.realpath(path)
            if key in seen:
                continue
            seen.add(key)
            out.append(Candidate(path, name, directory, ts, panic_like, fingerprint(st)))
    out.sort(key=lambda c: c.sort_ts, reverse=True)
    result.candidates += len(out)
    return out


# --------------------------------------------------------------------------- reading


def read_report_bytes(path: Path | str, max_bytes: int = MAX_READ_BYTES) -> tuple[bytes, int, float]:
    """Read at most ``max_bytes`` of a regular file without following a final symlink.

    Returns ``(data, file_size, mtime)``. Raises ``OSError`` (``PermissionError`` included)
    and ``ValueError`` for something that is not a regular file.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        chunks: list[bytes] = []
        remaining = max(0, int(max_bytes))
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks), st.st_size, st.st_mtime
    finally:
        os.close(fd)


_TEXT_BYTES = bytes([9, 10, 13, *range(32, 127), *range(128, 256)])


def _looks_binary(data: bytes) -> bool:
    head = data[:4096]
    if not head or b"\x00" in head:
        return True
    control = len(head.translate(None, _TEXT_BYTES))  # bytes that are not text
    return control / len(head) > 0.15


def parse_report_bytes(
    data: bytes, *, name: str = "", path: str = "", mtime: float | None = None,
    file_size: int | None = None,
) -> PanicRecord | None:
    """Parse and classify the bytes of one report; ``None`` for junk. Never raises."""
    try:
        if _looks_binary(data):
            log.debug("skipping %s: binary or empty", path or name)
            return None
        from metal_guard.forensics.formats import parse_report_text

        text = data.decode("utf-8", errors="replace")
        parsed = parse_report_text(text, name=name)
        if parsed is None:
            log.debug("skipping %s: not a recognised report", path or name)
            return None
        truncated = file_size is not None and file_size > len(data)
        return classify_parsed(parsed, path=path or name, mtime=mtime, truncated=truncated)
    except Exception:  # a parser bug must never take a scan down
        log.debug("parsing %s failed", path or name, exc_info=True)
        return None


def classify_parsed(
    parsed: ParsedReport, *, path: str, mtime: float | None = None, truncated: bool = False
) -> PanicRecord | None:
    """Turn a :class:`ParsedReport` into a classified :class:`PanicRecord`."""
    from metal_guard import classify
    from metal_guard.forensics.formats import GPU_EVENT

    ts, source = parsed.timestamp, parsed.timestamp_source
    if ts is None:
        if mtime is None:
            return None
        ts, source = mtime, "mtime"
    extra = dict(parsed.extra)
    if truncated or parsed.truncated:
        extra["truncated"] = True
    if parsed.bug_type:
        extra["bug_type"] = parsed.bug_type
    # The panic reason is at the top; the rest (backtraces, kext lists) only adds noise and time.
    text = parsed.text[:MAX_CLASSIFY_CHARS]
    found = classify.classify_mlx_error(text) if text else None
    if parsed.kind == KERNEL_PANIC:
        is_gpu = found is not None and found.kind == "kernel_panic"
        sig, explanation = classify.detect_panic_signature(text) if is_gpu else (None, None)
    elif parsed.kind == GPU_EVENT:  # the GPU itself was restarted: always GPU-related
        is_gpu = True
        sig = found.signature if found is not None else None
        explanation = found.description if found is not None else None
    else:
        # A crash counts as a GPU abort when a signature-bearing (GPU/Metal) class matched.
        is_gpu = found is not None and found.kind != "kernel_panic" and bool(found.signature)
        sig = found.signature if found is not None else None
        explanation = found.description if found is not None else None
    base = os.path.basename(path)
    return PanicRecord(
        path=path,
        timestamp=float(ts),
        kind=parsed.kind,
        is_gpu=is_gpu,
        signature=sig,
        error_class=found.name if found is not None else None,
        explanation=explanation or parsed.summary,
        pid=parsed.pid,
        process=parsed.process,
        report_id=parsed.incident_id or f"{base}@{int(ts)}",
        timestamp_source=source,
        excerpt=parsed.excerpt[:2000],
        extra=extra,
    )


def parse_report_file(path: Path | str, *, max_bytes: int = MAX_READ_BYTES) -> PanicRecord | None:
    """Read (capped, no symlink) and parse one report file; ``None`` if unreadable or junk."""
    try:
        data, size, mtime = read_report_bytes(path, max_bytes)
    except (OSError, ValueError) as exc:
        log.debug("skipping %s: %s", path, exc)
        return None
    return parse_report_bytes(data, name=os.path.basename(str(path)), path=str(path),
                              mtime=mtime, file_size=size)


# --------------------------------------------------------------------------- scanning



def scan_reports(
    dirs: Iterable[Path | str] | None = None,
    *,
    panic_since_ts: float | None = None,
    crash_since_ts: float | None = None,
    kinds: frozenset[str] = frozenset({"panic", "crash"}),
    now: datetime | float | None = None,
    max_bytes: int = MAX_READ_BYTES,
    max_panic_files: int = MAX_PANIC_FILES,
    max_crash_files: int = MAX_CRASH_FILES,
    cache_path: Path | None = None,
) -> ScanResult:
    """Scan report directories (default: ``Settings.report_dirs``); newest records first.

    Kernel panics older than ``panic_since_ts`` and crash reports older than
    ``crash_since_ts`` (header time) are dropped. A recent panic report that exists but
    cannot be read is an *error* (the verdict would be blind); unreadable crash reports and
    junk are only skipped. With ``cache_path``, files whose fingerprint (inode, size, mtime)
    is unchanged since the last scan are not read again (see :mod:`.scancache`).
    """
    if dirs is None:
        from metal_guard.settings import get_settings

        dirs = get_settings().report_dirs
    now_ts = _now_ts(now)
    result = ScanResult()
    candidates = iter_report_candidates(
        dirs, panic_since_ts=panic_since_ts, crash_since_ts=crash_since_ts, kinds=kinds,
        result=result,
    )
    limits = {True: max_panic_files, False: max_crash_files}
    taken = {True: 0, False: 0}
    records: dict[str, PanicRecord] = {}
    cache = ScanCache.load(cache_path)
    for cand in candidates:
        if taken[cand.panic_like] >= limits[cand.panic_like]:
            result.capped += 1
            continue
        taken[cand.panic_like] += 1
        hit, rec = cache.get(cand.path, cand.fingerprint)
        if not hit:
            try:
                data, size, mtime = read_report_bytes(cand.path, max_bytes)
            except (OSError, ValueError) as exc:
                if cand.panic_like and isinstance(exc, PermissionError):
                    result.errors.append(f"cannot read panic report {cand.path}: permission denied")
                else:
                    log.debug("skipping %s: %s", cand.path, exc)
                    result.skipped += 1
                continue
            rec = parse_report_bytes(data, name=cand.name, path=cand.path, mtime=mtime, file_size=size)
            cache.put(cand.path, cand.fingerprint, rec)
        if rec is None:
            result.skipped += 1
            continue
        if rec.kind == KERNEL_PANIC:
            if "panic" not in kinds:
                continue
            since = panic_since_ts
        else:
            if "crash" not in kinds:
                continue
            since = crash_since_ts
        if since is not None and rec.timestamp < since:
            continue
        if rec.timestamp > now_ts + FUTURE_TOLERANCE_SEC:
            log.debug("ignoring %s: dated in the future", cand.path)
            continue
        records.setdefault(rec.identity, rec)
    cache.save()
    result.records = sorted(records.values(), key=lambda r: r.timestamp, reverse=True)
    return result


def parse_panic_reports(
    directory: Path | str | Sequence[Path | str] | None = None,
    *,
    since_ts: float | None = None,
    include_crashes: bool = False,
    gpu_only: bool = False,
    now: datetime | float | None = None,
) -> list[PanicRecord]:
    """Parse kernel-panic reports (newest first), GPU and non-GPU alike.

    ``directory`` is one directory or a list (default: ``Settings.report_dirs``);
    ``since_ts`` drops older reports; ``include_crashes`` adds ``.ips`` crash reports;
    ``gpu_only`` keeps only records the classifier marked as GPU.
    """
    if directory is None:
        dirs: list[Path | str] | None = None
    elif isinstance(directory, str | Path):
        dirs = [directory]
    else:
        dirs = list(directory)
    kinds = frozenset({"panic", "crash"}) if include_crashes else frozenset({"panic"})
    result = scan_reports(dirs, panic_since_ts=since_ts, crash_since_ts=since_ts, kinds=kinds,
                          now=now)
    for err in result.errors:
        log.warning("%s", err)
    records = result.records
    if gpu_only:
        records = [r for r in records if r.is_gpu]
    return records
