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
are returned with ``is_gpu=False``. Reports directories are hostile input (another local user
may be able to add files to one): scanning never follows a symlink out of a reports
directory, opens files beneath the directory fd with no link followed at any component and
checks the opened fd is the file listed, opens only regular files, reads at most
:data:`MAX_READ_BYTES` per file, skips what cannot be a report (size, first bytes) before it
counts toward a cap, and drops old files by the date in their name (or their mtime) before
reading anything. A cap that stops a scan short of the window makes the scan *incomplete*,
never silently shorter. Parsers never raise: junk, truncated, binary or deeply nested input
gives ``None`` (with a debug log).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from metal_guard.clock import now_ts as _now_ts
from metal_guard.forensics.listing import (
    Candidate,
    RootFds,
    ScanResult,
    iter_report_candidates,
)
from metal_guard.forensics.records import KERNEL_PANIC, PanicRecord
from metal_guard.forensics.safefs import UnsafePathError, open_beneath
from metal_guard.forensics.scancache import ScanCache
from metal_guard.storage import open_nofollow, read_fd

if TYPE_CHECKING:  # the parsers are imported on first use: the gate often needs none
    from metal_guard.forensics.formats import ParsedReport

log = logging.getLogger("metal_guard.forensics.reports")

__all__ = [
    "MAX_READ_BYTES",
    "classify_parsed",
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
#: Parsed reports per kind and scan (junk does not count); candidates beyond are ``capped``.
MAX_PANIC_FILES = 200
MAX_CRASH_FILES = 500
#: Files looked at per kind and scan, junk included (bounds the work a flood of junk causes).
MAX_EXAMINED_PANIC_FILES = 2000
MAX_EXAMINED_CRASH_FILES = 5000
#: Bytes read first; a file whose start looks like no report format is not read further.
HEAD_BYTES = 64 * 1024
#: Reports dated further than this after "now" are ignored (clock trouble, junk, or a test clock).
FUTURE_TOLERANCE_SEC = 15 * 60



# --------------------------------------------------------------------------- reading


def read_report_bytes(
    path: Path | str, max_bytes: int = MAX_READ_BYTES, *, beneath: tuple[int, str] | None = None,
    expect: tuple[int, int] | None = None, head_check: bool = False,
) -> tuple[bytes, int, float]:
    """Read at most ``max_bytes`` of a regular file without following a symlink.

    Returns ``(data, file_size, mtime)``. With ``beneath=(dir_fd, rel)`` the file is opened
    as ``rel`` under ``dir_fd`` with no symlink followed at any component (``path`` is then
    only used in messages); with ``expect=(st_dev, st_ino)`` the opened file must be that
    one (:class:`~metal_guard.forensics.safefs.UnsafePathError` otherwise). With
    ``head_check``, a file whose first :data:`HEAD_BYTES` look like no report format is not
    read further (``data`` is then empty). Raises ``OSError`` (``PermissionError`` included)
    and ``ValueError`` for something that is not a regular file.
    """
    if beneath is not None:
        fd = open_beneath(beneath[0], beneath[1])
    else:
        fd = open_nofollow(path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if expect is not None and (st.st_dev, st.st_ino) != tuple(expect):
            raise UnsafePathError(f"{path} was replaced while the reports were scanned")
        if not head_check:
            return read_fd(fd, max_bytes), st.st_size, st.st_mtime
        head = read_fd(fd, min(HEAD_BYTES, max(0, int(max_bytes))))
        if not _plausible_head(head):
            return b"", st.st_size, st.st_mtime
        return head + read_fd(fd, int(max_bytes) - len(head)), st.st_size, st.st_mtime
    finally:
        os.close(fd)


_TEXT_BYTES = bytes([9, 10, 13, *range(32, 127), *range(128, 256)])
_HEAD_MARKERS = (b"panic(", b"Panic Report", b"Exception Type:", b"Process:",
                 b"Incident Identifier:", b"Date/Time:")


def _looks_binary(data: bytes) -> bool:
    head = data[:4096]
    if not head or b"\x00" in head:
        return True
    control = len(head.translate(None, _TEXT_BYTES))  # bytes that are not text
    return control / len(head) > 0.15


def _plausible_head(head: bytes) -> bool:
    """Could a report start like this? (A JSON header, or a text report's usual lines.)"""
    if _looks_binary(head):
        return False
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        return True
    return any(marker in head for marker in _HEAD_MARKERS)


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
    except Exception:  # a parser bug (or hostile nesting) must never take a scan down
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


def _read_candidate(cand: Candidate, roots: RootFds, max_bytes: int) -> tuple[bytes, int, float]:
    return read_report_bytes(cand.path, max_bytes, beneath=(roots.fd(cand), cand.rel),
                             expect=cand.file_id, head_check=True)


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
    max_examined_panic_files: int = MAX_EXAMINED_PANIC_FILES,
    max_examined_crash_files: int = MAX_EXAMINED_CRASH_FILES,
    cache_path: Path | None = None,
) -> ScanResult:
    """Scan report directories (default: ``Settings.report_dirs``); newest records first.

    Kernel panics older than ``panic_since_ts`` and crash reports older than
    ``crash_since_ts`` (header time) are dropped. A recent panic report that exists but
    cannot be read is an *error* (the verdict would be blind); unreadable crash reports and
    junk are only skipped. With ``cache_path``, files whose fingerprint (device, inode, size,
    mtime, ctime) is unchanged since the last scan are not read again (see :mod:`.scancache`).

    Caps: per kind, at most ``max_*_files`` parsed reports (junk does not count) and
    ``max_examined_*_files`` files looked at (junk included). When a cap stops the scan with
    panic candidates left, the scan is *incomplete*: ``errors`` says so and the gate answers
    exit 3 (unless a cooldown is already known), never "proceed".
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
    exam_limits = {True: max_examined_panic_files, False: max_examined_crash_files}
    taken = {True: 0, False: 0}
    examined = {True: 0, False: 0}
    left = {True: 0, False: 0}
    records: dict[str, PanicRecord] = {}
    cache = ScanCache.load(cache_path)
    roots = RootFds()
    try:
        for cand in candidates:
            k = cand.panic_like
            if taken[k] >= limits[k] or examined[k] >= exam_limits[k]:
                left[k] += 1
                continue
            examined[k] += 1
            hit, rec = cache.get(cand.path, cand.fingerprint)
            if not hit:
                try:
                    data, size, mtime = _read_candidate(cand, roots, max_bytes)
                except FileNotFoundError:  # rotated away (e.g. into Retired/) since the listing
                    result.skipped += 1
                    continue
                except (OSError, ValueError) as exc:
                    if k and isinstance(exc, OSError):
                        msg = f"cannot read panic report {cand.path}: {exc.strerror or exc}"
                        if msg not in result.errors:
                            result.errors.append(msg)
                    else:
                        log.debug("skipping %s: %s", cand.path, exc)
                        result.skipped += 1
                    continue
                rec = parse_report_bytes(data, name=cand.name, path=cand.path, mtime=mtime,
                                         file_size=size) if data else None
                cache.put(cand.path, cand.fingerprint, rec)
            if rec is None:
                result.skipped += 1
                continue
            taken[k] += 1
            result.sources[rec.path] = cand
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
    finally:
        roots.close()
    cache.save()
    result.examined = examined[True] + examined[False]
    for k, what in ((True, "panic"), (False, "crash")):
        if not left[k]:
            continue
        result.capped += left[k]
        msg = (f"cannot see every {what} report of the window: {left[k]} candidate file(s) left "
               f"unread after {taken[k]} report(s) in {examined[k]} file(s) (caps "
               f"{limits[k]} reports / {exam_limits[k]} files); junk or a flood of reports in "
               + ", ".join(result.dirs))
        result.incomplete[what] = msg
        (result.errors if k else result.notes).append(msg)
    result.records = sorted(records.values(), key=lambda r: r.timestamp, reverse=True)
    return result


def parse_panic_reports(
    directory: Path | str | Sequence[Path | str] | None = None,
    *,
    since_ts: float | None = None,
    include_crashes: bool = False,
    gpu_only: bool = False,
    now: datetime | float | None = None,
    errors: list[str] | None = None,
) -> list[PanicRecord]:
    """Parse kernel-panic reports (newest first), GPU and non-GPU alike.

    ``directory`` is one directory or a list (default: ``Settings.report_dirs``);
    ``since_ts`` drops older reports; ``include_crashes`` adds ``.ips`` crash reports;
    ``gpu_only`` keeps only records the classifier marked as GPU. Why the scan could not see
    the whole window (see :attr:`ScanResult.errors`) is logged as a warning and, when
    ``errors`` is a list, appended to it: an empty result with errors means "could not see",
    not "no panics".
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
    if errors is not None:
        errors.extend(result.errors)
    records = result.records
    if gpu_only:
        records = [r for r in records if r.is_gpu]
    return records
