"""Link-safe file access for the forensics layer: read beneath a directory, write into a bundle.

Two jobs, both about not being steered by links or renames that another local user plants:

* :func:`open_beneath` opens ``a/b/c`` under an already-open directory, one component at a
  time with ``O_NOFOLLOW`` (``O_DIRECTORY`` for the parents), so no symlink and no ``..`` is
  ever followed and a parent directory swapped by a racing ``rename`` cannot lead outside the
  directory the caller opened. Callers then check the opened fd (``fstat``), never the path.
* :class:`BundleDir` is an output directory (the postmortem bundle) held open by fd. It is
  created 0700 or, when it exists, must be a real directory owned by us that is empty or an
  earlier bundle and holds no symlinks. Every file is written through the directory fd as a
  unique temp file (``O_CREAT | O_EXCL | O_NOFOLLOW``, fsync) renamed over its final name, so
  a link planted under that name is replaced, never followed.

Portable to macOS (no ``openat2`` there): the walk uses only ``openat`` semantics
(``os.open(..., dir_fd=)``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from metal_guard.storage import open_nofollow, read_fd

__all__ = ["BundleDir", "UnsafePathError", "open_beneath", "read_fd"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC
#: The marker file that identifies an earlier bundle (an existing non-empty OUTDIR must have it).
BUNDLE_MARKER = "postmortem.json"


class UnsafePathError(OSError):
    """A path that would make us follow a link, leave a directory, or write somewhere foreign."""


def _components(rel: str) -> list[str]:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"not a plain relative path: {rel!r}")
    return parts


def open_beneath(dir_fd: int, rel: str, flags: int = os.O_RDONLY) -> int:
    """Open ``rel`` beneath ``dir_fd`` without following any symlink; return the new fd.

    Every intermediate component is opened ``O_DIRECTORY | O_NOFOLLOW`` relative to the one
    before, the last with ``flags | O_NOFOLLOW | O_NONBLOCK``. A symlink anywhere raises
    ``OSError`` (``ELOOP`` / ``ENOTDIR``); so does ``..`` or an absolute path.
    """
    parts = _components(rel)
    current = dir_fd
    opened: list[int] = []
    try:
        for part in parts[:-1]:
            current = os.open(part, _DIR_FLAGS, dir_fd=current)
            opened.append(current)
        return open_nofollow(parts[-1], flags, dir_fd=current)
    finally:
        for fd in opened:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # pragma: no cover - a zero-byte write is a full disk on some systems
            raise OSError(28, "short write")
        view = view[written:]


class BundleDir:
    """An output directory held open by fd; see the module docstring. Use as a context manager."""

    def __init__(self, path: Path, fd: int, *, created: bool) -> None:
        self.path = path
        self.fd = fd
        self.created = created
        self._subdirs: dict[str, int] = {}

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: Path | str) -> BundleDir:
        """Create ``path`` (0700) or take over an existing one that is safe to write into.

        Raises :class:`UnsafePathError` for a symlink, a directory owned by someone else, a
        non-empty directory that is not an earlier bundle, or one that holds a symlink;
        ``NotADirectoryError`` when ``path`` is a file.
        """
        out = Path(os.path.abspath(Path(path).expanduser()))
        created = False
        try:
            os.mkdir(out, 0o700)
            created = True
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(out.parent, mode=0o700, exist_ok=True)
            os.mkdir(out, 0o700)
            created = True
        try:
            st = os.lstat(out)
        except OSError as exc:
            raise UnsafePathError(f"{out}: {exc.strerror or exc}") from exc
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(f"{out} is a symbolic link; give the real directory")
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(f"{out} exists and is not a directory")
        try:
            fd = os.open(out, _DIR_FLAGS)
        except OSError as exc:
            raise UnsafePathError(f"cannot open {out} without following links: "
                                  f"{exc.strerror or exc}") from exc
        bundle = cls(out, fd, created=created)
        try:
            bundle._check_root()
        except BaseException:
            bundle.close()
            raise
        return bundle

    def _check_root(self) -> None:
        st = os.fstat(self.fd)
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            raise UnsafePathError(f"{self.path} is owned by uid {st.st_uid}, not by us; "
                                  "give a new directory")
        entries = os.listdir(self.fd)
        if entries and not self.created and BUNDLE_MARKER not in entries:
            raise UnsafePathError(f"{self.path} is not empty and holds no earlier bundle "
                                  f"({BUNDLE_MARKER}); give a new or empty directory")
        self._refuse_links(self.fd, self.path, depth=0)
        os.fchmod(self.fd, 0o700)

    def _refuse_links(self, fd: int, where: Path, depth: int) -> None:
        for name in os.listdir(fd):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePathError(f"{where / name} is a symbolic link; refusing to write a "
                                      "bundle into a directory with planted links")
            if stat.S_ISDIR(st.st_mode) and depth == 0:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                try:
                    self._refuse_links(sub, where / name, depth + 1)
                finally:
                    os.close(sub)

    # ------------------------------------------------------------------ writing

    def _subdir(self, name: str) -> int:
        fd = self._subdirs.get(name)
        if fd is not None:
            return fd
        _components(name)
        try:
            os.mkdir(name, 0o700, dir_fd=self.fd)
        except FileExistsError:
            pass
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            raise UnsafePathError(f"{self.path / name} is not a directory we can use without "
                                  f"following a link: {exc.strerror or exc}") from exc
        st = os.fstat(fd)
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            os.close(fd)
            raise UnsafePathError(f"{self.path / name} is owned by uid {st.st_uid}, not by us")
        self._subdirs[name] = fd
        return fd

    def write_bytes(self, rel: str, data: bytes) -> Path:
        """Write ``rel`` (``name`` or ``sub/name``) atomically through the directory fd."""
        parts = _components(rel)
        if len(parts) > 2:
            raise UnsafePathError(f"bundle paths are at most one directory deep: {rel!r}")
        dir_fd = self._subdir(parts[0]) if len(parts) == 2 else self.fd
        name = parts[-1]
        tmp = f".{name[:80]}.{os.urandom(6).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
        try:
            os.fsync(dir_fd)
        except OSError:  # pragma: no cover - some filesystems refuse fsync on a directory
            pass
        return self.path.joinpath(*parts)

    def write_text(self, rel: str, text: str) -> Path:
        return self.write_bytes(rel, text.encode("utf-8", "backslashreplace"))

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        for fd in self._subdirs.values():
            os.close(fd)
        self._subdirs.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BundleDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
