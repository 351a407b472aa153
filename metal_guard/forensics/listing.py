"""Finding report files: the directory listing, dates in names, trustworthy ordering.

Split from :mod:`metal_guard.forensics.reports`, which reads and parses what this lists.
Nothing here opens a report. :func:`iter_report_candidates` lists the files of the reports
directories that may fall in a time window, skips what cannot be a report (not a regular file,
too small, a symlink leading outside the directories), and orders the rest newest first by a
time no unprivileged user can move forward (see :class:`Candidate`). :class:`RootFds` holds the
directories open by fd while they are read, and checks each is still the directory listed.
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

from metal_guard.forensics.records import KERNEL_PANIC, PanicRecord
from metal_guard.forensics.safefs import UnsafePathError
from metal_guard.forensics.scancache import fingerprint

log = logging.getLogger("metal_guard.forensics.listing")

__all__ = ["Candidate", "RootFds", "ScanResult", "iter_report_candidates", "name_timestamp"]

#: File names carry local time; allow this much slack when comparing them with UTC epochs.
NAME_DATE_SLACK_SEC = 26 * 3600
#: A file smaller than this cannot hold a report (a header alone is longer): skipped unread.
MIN_REPORT_BYTES = 32

_SUFFIXES = (".panic", ".ips", ".crash")
_NAME_DATE_RE = re.compile(r"[12]\d{3}-[01]\d-[0-3]\d-[0-2]\d[0-5]\d[0-6]\d")
_PANIC_NAME_RE = re.compile(r"^(?:panic|kernel)", re.IGNORECASE)


@dataclass(frozen=True)
class Candidate:
    """A report file found by a directory scan, before it is read.

    ``path`` is where it was found (the real path for a followed symlink); it is read as
    ``rel`` beneath the directory ``real_root`` (whose ``(st_dev, st_ino)`` is ``root_id``),
    and the opened file must still be ``file_id``. ``sort_ts`` is the *trustworthy* time used
    for ordering: the time claimed by the name (or mtime), but never later than the file's
    ctime, which no unprivileged user can set. ``trusted_owner`` is False for a file owned by
    someone other than root, us or the directory's owner (macOS never writes those).
    """

    path: str
    name: str
    root: str
    sort_ts: float
    panic_like: bool
    fingerprint: str = ""
    real_root: str = ""
    rel: str = ""
    root_id: tuple[int, int] = (0, 0)
    file_id: tuple[int, int] = (0, 0)
    trusted_owner: bool = True


@dataclass
class ScanResult:
    """Outcome of :func:`scan_reports`.

    ``errors`` lists conditions that make a scan untrustworthy (a reports directory that
    exists but cannot be listed, a recent panic report that cannot be read, panic candidates
    left unread because a cap was hit): the gate turns them into exit code 3. ``incomplete``
    maps ``"panic"`` / ``"crash"`` to why that kind's window was not fully seen (the crash
    message is also in ``notes``, not in ``errors``: crash reports do not gate). ``skipped``
    counts junk/unreadable files, ``capped`` the candidates left unread. ``sources`` maps a
    record's ``path`` to the :class:`Candidate` it was read from.
    """

    records: list[PanicRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    candidates: int = 0
    skipped: int = 0
    capped: int = 0
    examined: int = 0
    incomplete: dict[str, str] = field(default_factory=dict)
    sources: dict[str, Candidate] = field(default_factory=dict)

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


def _root_of(path: str, roots: Sequence[str]) -> str | None:
    for root in roots:
        try:
            if os.path.commonpath([path, root]) == root:
                return root
        except ValueError:
            continue
    return None


def _dir_facts(directory: str) -> tuple[str, tuple[int, int], int | None]:
    real = os.path.realpath(directory)
    try:
        st = os.stat(real)
        return real, (st.st_dev, st.st_ino), st.st_uid
    except OSError:
        return real, (0, 0), None


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
    is kept only when it resolves inside one of ``dirs``; anything but a regular file, and
    files under :data:`MIN_REPORT_BYTES`, are skipped here (they never count toward a cap).
    Only the survivors of the name filter are ``lstat``'d, so a directory of thousands of old
    reports costs one ``listdir`` and a string compare each.

    The list is ordered newest first by trustworthy time (see :class:`Candidate`), files of
    trusted owners before the others.
    """
    result = result if result is not None else ScanResult()
    dir_list = [str(Path(d).expanduser()) for d in dirs]
    facts = {d: _dir_facts(d) for d in dir_list}
    real_roots = [f[0] for f in facts.values()]
    root_ids = {f[0]: f[1] for f in facts.values()}
    euid = os.geteuid() if hasattr(os, "geteuid") else -1
    cut = {True: _cutoff_stamp(panic_since_ts), False: _cutoff_stamp(crash_since_ts)}
    since = {True: panic_since_ts, False: crash_since_ts}
    want = {True: "panic" in kinds, False: "crash" in kinds}
    search = _NAME_DATE_RE.search
    out: list[Candidate] = []
    seen: set[tuple[int, int]] = set()
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
        real_root, _root_id, dir_uid = facts[directory]
        trusted_uids = {0, euid, dir_uid}
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
            base, rel = real_root, name
            try:
                st = os.lstat(path)
                claimed = name_timestamp(name) if match is not None else None
                if claimed is None:
                    claimed = st.st_mtime
                    cutoff = since[panic_like]
                    if cutoff is not None and claimed < cutoff - NAME_DATE_SLACK_SEC:
                        continue
                if stat.S_ISLNK(st.st_mode):
                    target = os.path.realpath(path)
                    found = _root_of(target, real_roots)
                    if found is None:
                        log.debug("skipping %s: symlink leads outside the reports dirs", path)
                        result.skipped += 1
                        continue
                    path, base, rel = target, found, os.path.relpath(target, found)
                    st = os.lstat(target)
            except OSError as exc:
                log.debug("skipping %s: %s", path, exc)
                result.skipped += 1
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size < MIN_REPORT_BYTES:
                log.debug("skipping %s: not a regular file of report size", path)
                result.skipped += 1
                continue
            file_id = (st.st_dev, st.st_ino)
            if file_id in seen:
                continue
            seen.add(file_id)
            out.append(Candidate(path, name, directory, min(claimed, st.st_ctime), panic_like,
                                 fingerprint(st), base, rel, root_ids.get(base, (0, 0)), file_id,
                                 st.st_uid in trusted_uids))
    out.sort(key=lambda c: (c.trusted_owner, c.sort_ts), reverse=True)
    result.candidates += len(out)
    return out


class RootFds:
    """Reports directories opened once per scan; each must still be the directory listed."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def fd(self, cand: Candidate) -> int:
        fd = self._fds.get(cand.real_root)
        if fd is None:
            fd = os.open(cand.real_root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
                         | getattr(os, "O_CLOEXEC", 0))
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != tuple(cand.root_id):
                os.close(fd)
                raise UnsafePathError(f"reports directory {cand.real_root} was replaced during the scan")
            self._fds[cand.real_root] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
