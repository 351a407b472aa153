"""Memory heartbeats: how guarded processes tell the status writer about their memory.

The status writer must never import MLX (that would initialise Metal in a process that does no
GPU work). Instead every guarded process calls :func:`publish_memory` with its own counters;
that atomically writes ``<cache>/heartbeats/<pid>.json``. :func:`read_published_memory`
collects the heartbeats of live processes (pid alive *and* the same ``create_time``, so a
reused pid does not count) and can prune the files of processes that are gone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import sys
import threading
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from metal_guard.clock import now_ts as _now_ts
from metal_guard.clock import utc_iso as _iso
from metal_guard.errors import StateFileError
from metal_guard.settings import settings_or_current as _settings

log = logging.getLogger("metal_guard.heartbeat")

__all__ = ["HEARTBEAT_STALE_SEC", "clear_published_memory", "publish_memory",
           "read_published_memory"]

HEARTBEAT_DIR = "heartbeats"
#: A heartbeat older than this is reported with ``stale: true``.
HEARTBEAT_STALE_SEC = 300.0
#: :func:`publish_memory` writes at most once per this many seconds per process (unless forced).
PUBLISH_MIN_INTERVAL_SEC = 1.0
#: A heartbeat file larger than this is corrupt (ours are well under 10 KiB).
HEARTBEAT_MAX_BYTES = 64 << 10
_MEM_KEYS = ("active_bytes", "peak_bytes", "cache_bytes", "limit_bytes", "footprint_bytes",
             "system_total_bytes", "system_available_bytes")
_publish_lock = threading.Lock()
_last_publish: dict[int, float] = {}


def to_jsonable(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if depth > 4:
        return str(value)[:200]
    if isinstance(value, Mapping):
        return {str(k)[:100]: to_jsonable(v, depth + 1) for k, v in list(value.items())[:100]}
    if isinstance(value, list | tuple):
        return [to_jsonable(v, depth + 1) for v in list(value)[:100]]
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)[:200]


def _stats_dict(stats: Any) -> dict[str, Any]:
    if stats is None:
        return {}
    if isinstance(stats, Mapping):
        return dict(stats)
    as_dict = getattr(stats, "as_dict", None)
    if callable(as_dict):
        return dict(as_dict())
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return dataclasses.asdict(stats)
    raise TypeError(f"publish_memory() needs a mapping or a stats object, got {type(stats).__name__}")


def _heartbeat_dir(settings: Any = None) -> Path:
    return Path(_settings(settings).cache_dir) / HEARTBEAT_DIR


def _create_time(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return None


def publish_memory(
    stats: Any, *, label: str | None = None, device: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None, force: bool = False,
    now: datetime | float | None = None, settings: Any = None,
) -> Path | None:
    """Publish this process's memory figures for the status writer (a "heartbeat").

    ``stats`` is a :class:`metal_guard.memory.MemoryStats`, a
    :class:`metal_guard.backend.MemoryCounters` or a plain dict with ``*_bytes`` keys.
    ``device`` may carry ``mx.device_info()`` so the snapshot can name the GPU family without
    importing MLX. Throttled to one write per second per process unless ``force``. Returns
    the heartbeat path, or ``None`` when throttled or when writing failed (never raises on
    I/O errors; a bad ``stats`` type is a ``TypeError``).
    """
    data = _stats_dict(stats)
    ts = _now_ts(now)
    pid = os.getpid()
    with _publish_lock:
        last = _last_publish.get(pid)
        if not force and last is not None and 0 <= ts - last < PUBLISH_MIN_INTERVAL_SEC:
            return None
        _last_publish[pid] = ts
    memory = {k: data.get(k) for k in _MEM_KEYS if isinstance(data.get(k), int)}
    for key in ("backend", "limit_source", "pressure", "footprint_source"):
        if isinstance(data.get(key), str):
            memory[key] = data[key]
    record: dict[str, Any] = {
        "pid": pid, "create_time": _create_time(pid), "published_at_ts": ts,
        "published_at": _iso(ts), "label": label, "memory": memory,
        "argv0": os.path.basename((sys.argv or [""])[0])[:100],
    }
    try:  # a rank of a distributed job says which (rank, world_size)
        from metal_guard.distributed import rank_fields

        record.update(rank_fields())
    except Exception:
        pass
    if device:
        record["device"] = to_jsonable(dict(device))
    if extra:
        record["extra"] = to_jsonable(dict(extra))
    path = _heartbeat_dir(settings) / f"{pid}.json"
    try:
        from metal_guard import storage

        storage.write_json(path, record)
    except OSError as exc:
        log.debug("could not publish memory heartbeat: %s", exc)
        return None
    return path


def clear_published_memory(pid: int | None = None, *, settings: Any = None) -> bool:
    """Remove a heartbeat (default: this process's), e.g. at exit."""
    from metal_guard import storage

    pid = os.getpid() if pid is None else int(pid)
    with _publish_lock:
        _last_publish.pop(pid, None)
    return storage.remove(_heartbeat_dir(settings) / f"{pid}.json")


def _alive(pid: int, create_time: Any) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    if isinstance(create_time, int | float):
        actual = _create_time(pid)
        if actual is not None and abs(actual - float(create_time)) > 1.0:
            return False  # the pid was reused
    return True


def read_published_memory(
    *, now: datetime | float | None = None, prune: bool = False, settings: Any = None,
    stale_after_sec: float = HEARTBEAT_STALE_SEC,
) -> list[dict[str, Any]]:
    """Heartbeats of live processes (``age_sec`` and ``stale`` added), newest first.

    Heartbeats of processes that are gone are skipped, and deleted when ``prune``.
    """
    from metal_guard import storage

    directory = _heartbeat_dir(settings)
    now_ts = _now_ts(now)
    out: list[dict[str, Any]] = []
    try:
        if stat.S_ISLNK(os.lstat(directory).st_mode):
            raise StateFileError(directory, "is a symbolic link; heartbeats are not read through it")
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except StateFileError:
        raise
    except OSError as exc:
        raise StateFileError(directory, f"cannot list heartbeats: {exc.strerror or exc}",
                             errno=exc.errno) from exc
    for name in names[:1000]:
        if not name.endswith(".json") or not name[:-5].isdigit():
            continue
        path = directory / name
        try:
            record: dict[str, Any] = storage.read_json(path, dict, max_bytes=HEARTBEAT_MAX_BYTES)
        except StateFileError as exc:
            log.warning("skipping a heartbeat that cannot be read: %s", exc)
            continue
        pid = record.get("pid")
        if not isinstance(pid, int) or pid <= 0 or str(pid) != name[:-5]:
            continue
        if not _alive(pid, record.get("create_time")):
            if prune:
                storage.remove(path)
            continue
        published = record.get("published_at_ts")
        age = now_ts - float(published) if isinstance(published, int | float) else None
        record["age_sec"] = None if age is None else round(max(0.0, age), 3)
        record["stale"] = age is None or age > stale_after_sec
        out.append(record)
    out.sort(key=lambda r: r.get("published_at_ts") or 0, reverse=True)
    return out
