"""Worker logs are created, never followed: a name planted in the log directory (a symlink to
someone's file, a dangling symlink, a file) is refused, not written through; logs are 0600
whatever the umask; a log swapped for a symlink is not read into an error message.

Real files, real symlinks, and one real runner start (its log name forced to the planted one).
"""

from __future__ import annotations

import os
import stat
import types
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from metal_guard.isolation import spawn
from metal_guard.isolation.runner import MLXSubprocessRunner
from metal_guard.storage import ensure_dir


@pytest.fixture
def log_dir() -> Path:
    return ensure_dir(spawn.worker_log_dir())


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


def test_a_symlink_at_the_log_path_is_not_followed(log_dir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    planted = log_dir / "model-1-abc.log"
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        spawn.open_new_log(planted, 0o600)
    assert victim.read_text() == "precious\n"
    assert planted.is_symlink()


def test_a_dangling_symlink_does_not_create_its_target(log_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "created-through-the-link"
    planted = log_dir / "model-2-abc.log"
    planted.symlink_to(target)
    with pytest.raises(FileExistsError):
        spawn.open_new_log(planted, 0o600)
    assert not target.exists()


def test_an_existing_file_is_not_appended_to(log_dir: Path) -> None:
    planted = log_dir / "model-3-abc.log"
    planted.write_text("someone else's\n")
    with pytest.raises(FileExistsError):
        spawn.open_new_log(planted, 0o600)
    assert planted.read_text() == "someone else's\n"


def test_a_new_log_is_0600_whatever_the_umask(log_dir: Path, permissive_umask: None) -> None:
    path = log_dir / "model-4-abc.log"
    fd = spawn.open_new_log(path, 0o600)
    try:
        os.write(fd, b"line\n")
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)
    assert stat.S_IMODE(path.lstat().st_mode) == 0o600 and path.read_bytes() == b"line\n"


def test_a_log_swapped_for_a_symlink_is_not_read(log_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN=hunter2\n")
    path = log_dir / "model-5-abc.log"
    path.symlink_to(secret)
    assert spawn.read_log_tail(path) == ""
    real = log_dir / "model-6-abc.log"
    real.write_bytes(b"x" * 100 + b"Fatal Python error: Aborted\n")
    assert spawn.read_log_tail(real, max_bytes=28) == "Fatal Python error: Aborted\n"


def test_a_runner_refuses_a_planted_log_and_starts_no_worker(
        log_dir: Path, tmp_path: Path, tiny_model_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real start path: the log name is forced to one where a symlink waits."""
    fixed = types.SimpleNamespace(hex="feedfacecafe0000")
    monkeypatch.setattr(spawn, "uuid", types.SimpleNamespace(uuid4=lambda: fixed))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    name = f"{spawn._slug(str(tiny_model_path))}-{os.getpid()}-{fixed.hex[:10]}.log"
    (log_dir / name).symlink_to(victim)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(FileExistsError):
        MLXSubprocessRunner(tiny_model_path, use_lock=False)
    assert victim.read_text() == "precious\n"
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
