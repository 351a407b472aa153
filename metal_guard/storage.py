"""Crash-safe state files: the only way metal-guard writes JSON or JSONL.

* :func:`write_json` — unique temp file in the same directory, ``fsync``, ``os.replace``, then
  ``fsync`` of the directory: a reader (or a reboot) sees the old or the new file, never half.
  Temp files of ours left by a killed writer (``.<name>.<8 chars>.tmp``) are swept later.
* :func:`append_bytes` / :func:`append_jsonl` — one whole record per call on an ``O_APPEND``,
  ``O_NOFOLLOW`` descriptor, or a loud :class:`~metal_guard.errors.StateFileError`: a short
  write is completed or undone, and a record never continues a torn line.
* :func:`update_json` — read-modify-write under a kernel file lock (``filelock``), so
  concurrent processes never lose an update.
* :func:`read_json` — a corrupt, truncated, empty, oversize, too deeply nested or foreign file
  (a directory, a symlink, a FIFO) is moved aside to ``<name>.corrupt-<utc-timestamp>``, a
  warning is logged, and fresh state is returned. A file that exists but *cannot be read*
  (permission denied, I/O error) is not fresh state: it raises ``StateFileError``, and
  nothing overwrites it.

Every read is capped (:data:`MAX_STATE_BYTES`, :data:`MAX_JSONL_BYTES`). Directories are
created ``0700`` (every missing parent, whatever the umask) and files ``0600``. The
directories metal-guard owns (``METALGUARD_HOME``, or the platform state and cache dirs, and
everything below them) must be real directories owned by this user: a symlink or a foreign
owner is refused, and a group/other mode bit is repaired to ``0700``.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import json
import logging
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from metal_guard.errors import StateFileError

log = logging.getLogger("metal_guard.storage")

T = TypeVar("T")

DIR_MODE = 0o700
FILE_MODE = 0o600
#: How long a locked update waits for another process before giving up.
LOCK_TIMEOUT_SEC = 30.0
#: A JSON state file larger than this is treated as corrupt (never read whole).
MAX_STATE_BYTES = 4 << 20
#: Only this much of the end of a JSONL file is read.
MAX_JSONL_BYTES = 8 << 20
#: JSON nested deeper than this is treated as corrupt.
MAX_NESTING = 64
#: Our temp files older than this are leftovers of a killed writer and are deleted.
STALE_TEMP_SEC = 600.0
#: How often (per directory and process) the temp-file sweep runs.
SWEEP_INTERVAL_SEC = 60.0

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_TEMP_RE = re.compile(r"\A\..+\.[a-z0-9_]{8}\.tmp\Z")
_sweep_lock = threading.Lock()
_last_sweep: dict[str, float] = {}
_warned_modes: set[str] = set()


class NotAStateFile(ValueError):
    """Something that is not a regular file (of ours, when asked) sits at the path: a
    symbolic link, a directory, a FIFO or device, or another user's file. State readers
    quarantine it; other readers skip it (a ``ValueError``, as "not a regular file" always was)."""


# --------------------------------------------------------------------------- directories


def _managed_root(path: Path, settings: Any = None) -> Path | None:
    """The metal-guard directory (home, state or cache dir) that contains ``path``, if any."""
    try:
        if settings is None:
            from metal_guard.settings import get_settings

            settings = get_settings()
        s = settings
        roots = [s.home] if s.home is not None else [s.state_dir, s.cache_dir]
    except Exception:  # an invalid setting is reported by whoever reads the settings
        return None
    where = os.fspath(path)
    for root in roots:
        top = os.path.abspath(root)
        if _is_within(where, top):
            return Path(top)
    return None


def _is_within(path: str, root: str) -> bool:
    """Whether the normalised absolute ``path`` is ``root`` or lies below it (string
    compare: ``pathlib``'s ``parents`` costs tens of microseconds per call)."""
    return path == root or path.startswith(root if root.endswith(os.sep) else root + os.sep)


def _make_dirs(path: Path) -> None:
    """``mkdir -p`` where every directory created gets mode 0700 (``os.makedirs`` applies
    the mode to the last component only)."""
    missing: list[Path] = []
    probe = path
    while True:
        try:
            os.lstat(probe)
            break
        except FileNotFoundError:
            missing.append(probe)
            if probe.parent == probe:
                break
            probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(directory, DIR_MODE)  # a umask such as 0o277 may have removed owner bits


def _check_private(root: Path, path: Path) -> None:
    """Every directory from ``root`` down to ``path``: a real directory, ours, mode 0700.

    Checked top-down, and a missing directory is created only once its parent passed, so
    nothing is ever created through a link.
    """
    euid = os.geteuid()
    chain = [os.fspath(root)]
    below = os.fspath(path)[len(chain[0]):].strip(os.sep)
    for part in below.split(os.sep) if below else ():
        chain.append(os.path.join(chain[-1], part))
    for directory in chain:
        try:
            st = os.lstat(directory)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, DIR_MODE)
                os.chmod(directory, DIR_MODE, follow_symlinks=False)
            st = os.lstat(directory)
        if stat.S_ISLNK(st.st_mode):
            raise StateFileError(directory, "is a symbolic link; metal-guard keeps its state "
                                 "only in a real directory (replace the link with a directory)")
        if not stat.S_ISDIR(st.st_mode):
            raise StateFileError(directory, "is not a directory")
        if st.st_uid != euid:
            raise StateFileError(directory, f"is owned by uid {st.st_uid}, not by this user "
                                 f"(uid {euid}); refusing to keep state there")
        if st.st_mode & 0o077:
            os.chmod(directory, DIR_MODE, follow_symlinks=False)
            if str(directory) not in _warned_modes:
                _warned_modes.add(str(directory))
                log.warning("state directory %s had mode %04o; repaired to 0700", directory,
                            stat.S_IMODE(st.st_mode))


def ensure_dir(path: Path, *, settings: Any = None) -> Path:
    """Create ``path`` and missing parents with mode 0700; return it.

    Inside metal-guard's own directories the whole chain is checked (real directories owned
    by this user, group/other bits removed); raises :class:`StateFileError` otherwise.
    ``settings`` (default: the current ones) say where those directories are.
    """
    path = Path(os.path.abspath(path))
    try:
        root = _managed_root(path, settings)
        if root is None:
            _make_dirs(path)
            if not path.is_dir():
                raise StateFileError(path, "is not a directory")
        else:
            if not os.path.lexists(root):
                _make_dirs(root)  # the root and its missing parents (the parents are not ours)
            _check_private(root, path)
    except StateFileError:
        raise
    except OSError as exc:
        raise StateFileError(path, f"cannot create or check the directory: {exc.strerror or exc}",
                             errno=exc.errno) from exc
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | _CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sweep_stale_temps(directory: Path, *, max_age_sec: float = STALE_TEMP_SEC,
                      now: float | None = None) -> int:
    """Delete our temp files (``.<name>.<8 chars>.tmp``) older than ``max_age_sec`` in
    ``directory``; return how many. Only regular files owned by this user are touched."""
    removed = 0
    at = time.time() if now is None else now
    euid = os.geteuid()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries[:10000]:
        if not _TEMP_RE.match(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_uid == euid and at - st.st_mtime > max_age_sec:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    if removed:
        log.info("removed %d stale temp file(s) in %s", removed, directory)
    return removed


def _maybe_sweep(directory: Path) -> None:
    if _managed_root(directory) is None:
        return
    now = time.monotonic()
    key = str(directory)
    with _sweep_lock:
        last = _last_sweep.get(key)
        if last is not None and now - last < SWEEP_INTERVAL_SEC:
            return
        _last_sweep[key] = now
    sweep_stale_temps(directory)


# --------------------------------------------------------------------------- writing


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` (temp file + fsync + rename + dir fsync)."""
    path = Path(path)
    ensure_dir(path.parent)
    _maybe_sweep(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), FILE_MODE)
            fh.write(data)  # a buffered write writes everything or raises
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as JSON to ``path``."""
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8") + b"\n"
    write_bytes_atomic(path, data)


def _open_append(path: Path, ours: bool) -> int:
    """An ``O_APPEND`` descriptor on a regular file of ours at ``path`` (never via a link).

    Inside our directories a link, directory, FIFO or hard link at ``path`` is moved aside
    and a fresh file created; elsewhere (a configured path) it is refused.
    """
    for attempt in range(3):
        try:
            fd = open_nofollow(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        except OSError as exc:
            if attempt < 2 and ours and exc.errno in (_errno.ELOOP, _errno.EISDIR, _errno.ENXIO,
                                                      _errno.EMLINK):
                _quarantine_or_raise(path, f"not a regular file ({exc.strerror})")
                continue
            raise StateFileError(path, f"cannot open for appending: {exc.strerror or exc}",
                                 errno=exc.errno) from exc
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "not a regular file"
        elif st.st_nlink > 1:
            problem = "a hard link to another file"
        if problem is None:
            if st.st_mode & 0o077 and st.st_uid == os.geteuid():
                with contextlib.suppress(OSError):
                    os.fchmod(fd, FILE_MODE)
            return fd
        os.close(fd)
        if not ours:  # a configured path outside our directories: never moved, never written
            raise StateFileError(path, f"is {problem}; refusing to append to it")
        if attempt < 2:
            _quarantine_or_raise(path, problem)
    raise StateFileError(path, "keeps being replaced by something that is not a regular file")


def _undo_partial(fd: int, written: int) -> None:
    """Cut our partial record off the end of the file, if nobody appended after it."""
    with contextlib.suppress(OSError):
        end = os.lseek(fd, 0, os.SEEK_CUR)
        if os.fstat(fd).st_size == end and end >= written:
            os.ftruncate(fd, end - written)


def append_bytes(path: Path, data: bytes, *, fsync: bool = True, heal: bytes = b"\n",
                 settings: Any = None) -> None:
    """Append one whole record (``data``, ending in ``\\n``) to ``path``, or raise.

    The record goes out in one ``write`` when the disk allows; a short write is completed, and
    if that fails the partial bytes are cut off again and :class:`StateFileError` is raised.
    If the file does not end with a newline (a torn record of a crashed writer), ``heal`` is
    written first so that this record starts on a line of its own.
    """
    path = Path(os.path.abspath(path))
    if settings is None:
        from metal_guard.settings import get_settings

        settings = get_settings()
    ensure_dir(path.parent, settings=settings)
    fd = _open_append(path, _managed_root(path.parent, settings) is not None)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = heal + data
        view = memoryview(data)
        written = 0
        try:
            while written < len(view):
                n = os.write(fd, view[written:])
                if n <= 0:
                    raise OSError(_errno.ENOSPC, "no space left on device")
                written += n
            if fsync:
                os.fsync(fd)
        except OSError as exc:
            if written < len(view):
                _undo_partial(fd, written)
                what = f"only {written} of {len(data)} bytes could be written"
            else:
                what = "fsync failed"
            raise StateFileError(path, f"record not appended ({what}): {exc.strerror or exc}",
                                 errno=exc.errno) from exc
    finally:
        os.close(fd)


def append_jsonl(path: Path, record: Any, *, fsync: bool = True) -> None:
    """Append one JSON record as a line: the whole line, or :class:`StateFileError`."""
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode("utf-8")
    append_bytes(path, line, fsync=fsync)


# --------------------------------------------------------------------------- reading


def _utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def quarantine(path: Path, reason: str) -> Path | None:
    """Move a bad state file aside to ``<name>.corrupt-<utc>``; return the new path.

    A symlink or directory is moved as it is (a link is never followed). ``None`` when the
    file was already gone or could not be moved (logged).
    """
    path = Path(path)
    target = path.with_name(f"{path.name}.corrupt-{_utc_stamp()}")
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("could not quarantine corrupt state file %s (%s): %s", path, reason, exc)
        return None
    log.warning("state file %s was unusable (%s); moved to %s, starting fresh", path, reason, target)
    return target


def _quarantine_or_raise(path: Path, reason: str) -> None:
    if quarantine(path, reason) is None and os.path.lexists(path):
        raise StateFileError(path, f"{reason}, and it could not be moved aside")


# --------------------------------------------------------------------------- no-follow reads
# The one link-safe open of the package: migrate, forensics, the lock probe, the distributed
# topology reader and the serve log sink all open files through these.


def open_nofollow(path: str | os.PathLike[str], flags: int = os.O_RDONLY, mode: int = FILE_MODE,
                  *, dir_fd: int | None = None) -> int:
    """``os.open`` that never follows a symbolic link at the last component (``O_NOFOLLOW``:
    ``ELOOP``), never blocks on a FIFO (``O_NONBLOCK``) and is closed on ``exec``; ``path``
    relative to ``dir_fd`` when given.

    Callers check what they opened with ``os.fstat`` on the descriptor, never on the path.
    """
    return os.open(path, flags | _NOFOLLOW | _NONBLOCK | _CLOEXEC, mode, dir_fd=dir_fd)


def open_regular(path: str | os.PathLike[str], *, owner: int | None = None,
                 ) -> tuple[int, os.stat_result] | None:
    """A read-only descriptor on the regular file at ``path`` and its ``fstat``; ``None``
    when nothing is there.

    Raises :class:`NotAStateFile` ("is a symbolic link", "is a directory", "is not a regular
    file", or with ``owner`` "belongs to uid N, not to this user") and ``OSError`` for any
    other failure. The caller closes the descriptor.
    """
    try:
        fd = open_nofollow(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (_errno.ELOOP, _errno.EMLINK) and os.path.islink(path):
            raise NotAStateFile("is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise NotAStateFile("is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise NotAStateFile("is not a regular file")
        if owner is not None and st.st_uid != owner:
            raise NotAStateFile(f"belongs to uid {st.st_uid}, not to this user")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_fd(fd: int, max_bytes: int, *, offset: int | None = None) -> bytes:
    """At most ``max_bytes`` from ``fd``: from its current position, or from ``offset``
    (``pread``, the position is left alone)."""
    chunks: list[bytes] = []
    remaining = max(0, int(max_bytes))
    while remaining > 0:
        if offset is None:
            chunk = os.read(fd, min(remaining, 1 << 20))
        else:
            chunk = os.pread(fd, min(remaining, 1 << 20), offset)
            offset += len(chunk)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_bytes_capped(path: Path, max_bytes: int, *, tail: bool) -> tuple[bytes, bool] | None:
    """``(data, truncated)`` of the regular file at ``path`` (``None`` when missing).

    At most ``max_bytes`` are read: the start (``tail=False``: a larger file is
    :class:`NotAStateFile`, "oversize") or the end (``tail=True``). A symlink, directory or other
    non-regular file is :class:`NotAStateFile`; any other failure is :class:`StateFileError`.
    """
    try:
        opened = open_regular(path)
    except OSError as exc:
        raise StateFileError(path, f"cannot read: {exc.strerror or exc}", errno=exc.errno) from exc
    if opened is None:
        return None
    fd, st = opened
    try:
        truncated = st.st_size > max_bytes
        if truncated and not tail:
            raise NotAStateFile(f"oversize: {st.st_size} bytes, the limit is {max_bytes}")
        start = max(0, st.st_size - max_bytes) if tail else 0
        data = read_fd(fd, max_bytes + (0 if tail else 1), offset=start)
        if not tail and len(data) > max_bytes:  # grew while we read
            raise NotAStateFile(f"oversize: more than {max_bytes} bytes")
        return data, truncated or start > 0
    except OSError as exc:
        raise StateFileError(path, f"cannot read: {exc.strerror or exc}", errno=exc.errno) from exc
    finally:
        os.close(fd)


def nesting_ok(obj: Any, limit: int = MAX_NESTING) -> bool:
    """Whether ``obj`` (parsed JSON) nests lists/dicts at most ``limit`` deep (no recursion)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def loads_bounded(raw: bytes) -> Any:
    """``json.loads`` that turns every kind of bad input into ``ValueError`` (deep nesting,
    huge numbers and undecodable bytes included)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise ValueError(f"invalid JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not nesting_ok(obj):
        raise ValueError(f"JSON nested deeper than {MAX_NESTING} levels")
    return obj


def read_json(
    path: Path,
    default: Callable[[], T],
    *,
    expect: type | tuple[type, ...] = dict,
    validate: Callable[[Any], bool] | None = None,
    max_bytes: int = MAX_STATE_BYTES,
) -> T:
    """Read JSON state from ``path``.

    A missing file gives ``default()``. A file that is empty, not JSON, too large, too deeply
    nested, not of type ``expect``, rejected by ``validate``, or not a regular file is
    quarantined and ``default()`` is returned. A file that cannot be read raises
    :class:`StateFileError` (an unreadable safety file is never "fresh state").
    """
    path = Path(path)
    try:
        got = read_bytes_capped(path, max_bytes, tail=False)
    except NotAStateFile as exc:
        _quarantine_or_raise(path, str(exc))
        return default()
    if got is None:
        return default()
    raw = got[0]
    if not raw.strip():
        _quarantine_or_raise(path, "empty file")
        return default()
    try:
        obj = loads_bounded(raw)
    except ValueError as exc:
        _quarantine_or_raise(path, str(exc))
        return default()
    if not isinstance(obj, expect) or (validate is not None and not _safe_validate(validate, obj)):
        _quarantine_or_raise(path, f"unexpected content ({type(obj).__name__})")
        return default()
    return obj  # type: ignore[return-value,no-any-return]


def _safe_validate(validate: Callable[[Any], bool], obj: Any) -> bool:
    try:
        return bool(validate(obj))
    except Exception:
        return False


def read_jsonl_counted(path: Path, *, max_bytes: int = MAX_JSONL_BYTES) -> tuple[list[Any], int]:
    """``(records, bad)``: the JSON lines of the last ``max_bytes`` of ``path`` and how many
    complete lines did not parse. An unterminated last line that does not parse is a record
    still being written (or torn by a crash) and is skipped without counting.

    A symlink or directory at ``path`` is quarantined (no records); an unreadable file raises
    :class:`StateFileError`.
    """
    path = Path(path)
    try:
        got = read_bytes_capped(path, max_bytes, tail=True)
    except NotAStateFile as exc:
        _quarantine_or_raise(path, str(exc))
        return [], 0
    if got is None:
        return [], 0
    data, truncated = got
    pieces = data.split(b"\n")
    if truncated:
        pieces = pieces[1:]  # the first line is cut by the tail read
    unterminated = pieces.pop() if pieces else b""  # b"" when the data ends with a newline
    records: list[Any] = []
    bad = 0
    for raw_line in pieces:
        if not raw_line.strip():
            continue
        try:
            records.append(loads_bounded(raw_line))
        except ValueError:
            bad += 1
    if unterminated.strip():
        with contextlib.suppress(ValueError):
            records.append(loads_bounded(unterminated))
    if bad:
        log.debug("skipped %d unreadable line(s) in %s", bad, path)
    return records, bad


def read_jsonl(path: Path, *, max_bytes: int | None = None) -> list[Any]:
    """The JSON lines of ``path`` (its last ``max_bytes``, default :data:`MAX_JSONL_BYTES`),
    skipping lines that do not parse. See :func:`read_jsonl_counted`."""
    return read_jsonl_counted(path, max_bytes=MAX_JSONL_BYTES if max_bytes is None else max_bytes)[0]


# --------------------------------------------------------------------------- locking


def lock_path_for(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _check_lock_file(lock_file: Path) -> None:
    """A lock file that is a directory, symlink or other non-regular file would block every
    update (or make ``filelock`` truncate a link's target): move it aside."""
    try:
        st = os.lstat(lock_file)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StateFileError(lock_file, f"cannot check the lock file: {exc.strerror or exc}",
                             errno=exc.errno) from exc
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        return
    kind = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "a directory"
            if stat.S_ISDIR(st.st_mode) else "a hard link" if stat.S_ISREG(st.st_mode)
            else "not a regular file")
    _quarantine_or_raise(lock_file, f"the lock file is {kind}")


@contextlib.contextmanager
def locked(path: Path, timeout: float = LOCK_TIMEOUT_SEC) -> Iterator[None]:
    """Hold the kernel lock that guards read-modify-write of ``path``.

    Re-entrant within a thread (one lock object per path, counting nested holds); other
    threads and processes wait up to ``timeout`` seconds, then ``filelock.Timeout`` is raised.
    """
    import filelock

    lock_file = lock_path_for(path)
    ensure_dir(lock_file.parent)
    _check_lock_file(lock_file)
    lock = filelock.FileLock(str(lock_file), mode=FILE_MODE, is_singleton=True)
    with lock.acquire(timeout=timeout):
        yield


def update_json(
    path: Path,
    fn: Callable[[T], T | None],
    default: Callable[[], T],
    *,
    expect: type | tuple[type, ...] = dict,
    validate: Callable[[Any], bool] | None = None,
    timeout: float = LOCK_TIMEOUT_SEC,
) -> T:
    """Read-modify-write ``path`` under its file lock; return the new state.

    ``fn`` receives the current state (fresh state if missing or corrupt) and returns the new
    state, or ``None`` to mutate in place. If ``fn`` raises, or the file cannot be read
    (:class:`StateFileError`), nothing is written.
    """
    with locked(path, timeout):
        state = read_json(path, default, expect=expect, validate=validate)
        result = fn(state)
        new_state = state if result is None else result
        write_json(path, new_state)
        return new_state


def remove(path: Path) -> bool:
    """Delete a state file; return whether it existed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    _fsync_dir(Path(path).parent)
    return True
