"""Where the children's stdout/stderr go: one size-capped log file per front, plus a tail.

The file is ``<state>/serve/<host>-<port>.log`` (0600, directory 0700), rotated to ``.1`` when
it passes ``max_bytes``. Each child keeps its own bounded :class:`Tail` of recent lines in
memory, which is what a crash is classified from (no re-reading of the file).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import threading
from pathlib import Path
from typing import BinaryIO

__all__ = ["LogSink", "Tail", "default_log_path"]

#: A line longer than this is cut (hostile or binary output must not grow the tail).
MAX_LINE_BYTES = 4096
TAIL_LINES = 200
DEFAULT_MAX_BYTES = 20 << 20


def default_log_path(host: str, port: int) -> Path:
    from metal_guard.settings import get_settings

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", host)[:64] or "host"
    return get_settings().state_dir / "serve" / f"{safe}-{int(port)}.log"


class Tail:
    """The last :data:`TAIL_LINES` lines (each at most :data:`MAX_LINE_BYTES`) of a stream."""

    def __init__(self, lines: int = TAIL_LINES) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=lines)
        self._partial = b""
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        with self._lock:
            buf = self._partial + data
            *done, self._partial = buf.split(b"\n")
            if len(self._partial) > MAX_LINE_BYTES:
                done.append(self._partial)
                self._partial = b""
            for raw in done:
                self._lines.append(raw[:MAX_LINE_BYTES].decode("utf-8", "replace").rstrip("\r"))

    def text(self) -> str:
        with self._lock:
            lines = list(self._lines)
            if self._partial:
                lines.append(self._partial[:MAX_LINE_BYTES].decode("utf-8", "replace"))
        return "\n".join(lines)


class LogSink:
    """An append-only log file shared by successive children; thread-safe, size-capped."""

    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max(4096, int(max_bytes))
        self._lock = threading.Lock()
        self._fh: BinaryIO | None = None
        self._size = 0

    def _open(self) -> BinaryIO:
        if self._fh is None:
            from metal_guard.storage import ensure_dir, open_nofollow

            ensure_dir(self.path.parent)
            fd = open_nofollow(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            self._fh = os.fdopen(fd, "ab", buffering=0)
            self._size = os.fstat(fd).st_size
        return self._fh

    def write(self, data: bytes) -> None:
        """Append ``data``; rotate first when the file is full. Never raises."""
        with self._lock:
            try:
                if self._fh is not None and self._size + len(data) > self.max_bytes:
                    self._rotate()
                fh = self._open()
                fh.write(data)
                self._size += len(data)
            except OSError:
                pass

    def _rotate(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        with contextlib.suppress(OSError):
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                with contextlib.suppress(OSError):
                    self._fh.close()
                self._fh = None
