"""Crash-safe state files: the only way metal-guard writes JSON or JSONL.

* :func:`write_json` — unique temp file in the same directory, ``fsync``, ``os.replace``, then
  ``fsync`` of the directory: a reader (or a reboot) sees the old or the new file, never half.
* :func:`append_jsonl` — one line per record, written with a single ``write`` on an
  ``O_APPEND`` descriptor and ``fsync``'d.
* :func:`update_json` — read-modify-write under a kernel file lock (``filelock``), so
  concurrent processes never lose an update.
* :func:`read_json` — a corrupt, truncated, empty or foreign file is moved aside to
  ``<name>.corrupt-<utc-timestamp>``, a warning is logged once, and fresh state is returned.

Directories are created ``0700`` and files ``0600``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("metal_guard.storage")

T = TypeVar("T")

DIR_MODE = 0o700
FILE_MODE = 0o600
#: How long a locked update waits for another process before giving up.
LOCK_TIMEOUT_SEC = 30.0


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 if missing; return it."""
    path = Path(path)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        with contextlib.suppress(OSError):
            os.chmod(path, DIR_MODE)
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` (temp file + fsync + rename + dir fsync)."""
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), FILE_MODE)
            fh.write(data)
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


def _utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def quarantine(path: Path, reason: str) -> Path | None:
    """Move a bad state file aside to ``<name>.corrupt-<utc>``; return the new path."""
    path = Path(path)
    target = path.with_name(f"{path.name}.corrupt-{_utc_stamp()}")
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("could not quarantine corrupt state file %s (%s): %s", path, reason, exc)
        return None
    log.warning("state file %s was unreadable (%s); moved to %s, starting fresh", path, reason, target)
    return target


def read_json(
    path: Path,
    default: Callable[[], T],
    *,
    expect: type | tuple[type, ...] = dict,
    validate: Callable[[Any], bool] | None = None,
) -> T:
    """Read JSON state from ``path``.

    A missing file gives ``default()``. A file that is empty, not JSON, not of type ``expect``
    or rejected by ``validate`` is quarantined and ``default()`` is returned.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return default()
    except IsADirectoryError:
        quarantine(path, "is a directory")
        return default()
    except OSError as exc:
        log.warning("cannot read state file %s: %s; using fresh state", path, exc)
        return default()
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        quarantine(path, "empty file" if not raw.strip() else f"invalid JSON: {exc}")
        return default()
    if not isinstance(obj, expect) or (validate is not None and not _safe_validate(validate, obj)):
        quarantine(path, f"unexpected content ({type(obj).__name__})")
        return default()
    return obj  # type: ignore[return-value,no-any-return]


def _safe_validate(validate: Callable[[Any], bool], obj: Any) -> bool:
    try:
        return bool(validate(obj))
    except Exception:
        return False


def lock_path_for(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def locked(path: Path, timeout: float = LOCK_TIMEOUT_SEC) -> Iterator[None]:
    """Hold the kernel lock that guards read-modify-write of ``path``.

    Re-entrant within a thread (one lock object per path, counting nested holds); other
    threads and processes wait up to ``timeout`` seconds, then ``filelock.Timeout`` is raised.
    """
    import filelock

    lock_file = lock_path_for(path)
    ensure_dir(lock_file.parent)
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
    state, or ``None`` to mutate in place. If ``fn`` raises, nothing is written.
    """
    with locked(path, timeout):
        state = read_json(path, default, expect=expect, validate=validate)
        result = fn(state)
        new_state = state if result is None else result
        write_json(path, new_state)
        return new_state


def append_jsonl(path: Path, record: Any, *, fsync: bool = True) -> None:
    """Append one JSON record as a line; the line is written by one ``write`` call."""
    path = Path(path)
    ensure_dir(path.parent)
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    try:
        os.write(fd, line)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path, *, max_bytes: int | None = None) -> list[Any]:
    """Read JSON lines, skipping (and counting in a debug log) lines that do not parse.

    ``max_bytes`` reads only the tail of a large file.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            if max_bytes is not None:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - max_bytes))
                if size > max_bytes:
                    fh.readline()  # drop the partial first line
            data = fh.read()
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return []
    records: list[Any] = []
    bad = 0
    for raw_line in data.splitlines():
        if not raw_line.strip():
            continue
        try:
            records.append(json.loads(raw_line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            bad += 1
    if bad:
        log.debug("skipped %d unreadable line(s) in %s", bad, path)
    return records


def remove(path: Path) -> bool:
    """Delete a state file; return whether it existed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    _fsync_dir(Path(path).parent)
    return True
