"""The one link-safe open of the package: storage.open_nofollow / open_regular / read_fd."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from metal_guard.storage import NotAStateFile, open_nofollow, open_regular, read_fd

PACKAGE = Path(__file__).resolve().parents[1] / "metal_guard"


def test_a_regular_file_is_opened_with_its_stat(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    opened = open_regular(path, owner=os.geteuid())
    assert opened is not None
    fd, st = opened
    try:
        assert st.st_size == 10 and os.get_inheritable(fd) is False
        assert read_fd(fd, 4) == b"0123" and read_fd(fd, 100) == b"456789"
        assert read_fd(fd, 3, offset=2) == b"234"
        assert read_fd(fd, 0) == b"" and read_fd(fd, -5, offset=0) == b""
    finally:
        os.close(fd)


def test_missing_is_none(tmp_path: Path) -> None:
    assert open_regular(tmp_path / "absent") is None


@pytest.mark.parametrize(("kind", "message"), [
    ("symlink", "is a symbolic link"),
    ("dangling", "is a symbolic link"),
    ("directory", "is a directory"),
    ("fifo", "is not a regular file"),
])
def test_what_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str, message: str) -> None:
    target = tmp_path / "target"
    target.write_text("secret")
    path = tmp_path / "p"
    if kind == "symlink":
        path.symlink_to(target)
    elif kind == "dangling":
        path.symlink_to(tmp_path / "nowhere")
    elif kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)  # a blocking open would hang here: no writer ever comes
    with pytest.raises(NotAStateFile, match=message) as info:
        open_regular(path)
    assert isinstance(info.value, ValueError)


def test_a_link_is_not_followed_for_writing_either(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("keep")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OSError) as info:
        open_nofollow(tmp_path / "link", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    assert info.value.errno in (errno.ELOOP, errno.EMLINK)
    assert target.read_text() == "keep"


def test_relative_to_a_directory_fd(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "l").symlink_to(tmp_path / "f")
    dfd = os.open(tmp_path, os.O_RDONLY)
    try:
        fd = open_nofollow("f", dir_fd=dfd)
        os.close(fd)
        with pytest.raises(OSError):
            open_nofollow("l", dir_fd=dfd)
    finally:
        os.close(dfd)


def test_another_users_file_is_refused_when_an_owner_is_asked(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another uid")
    path = tmp_path / "f"
    path.write_text("x")
    os.chown(path, 54321, 54321)
    with pytest.raises(NotAStateFile, match="belongs to uid 54321"):
        open_regular(path, owner=os.geteuid())
    opened = open_regular(path)  # without owner= any regular file will do
    assert opened is not None
    os.close(opened[0])


def test_no_module_opens_files_without_following_links_on_its_own() -> None:
    """Every O_NOFOLLOW open goes through storage (safefs walks directories with it too)."""
    allowed = {PACKAGE / "storage.py", PACKAGE / "forensics" / "safefs.py"}
    pattern = re.compile(r'os\.O_NOFOLLOW|"O_NOFOLLOW"')
    offenders = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                 if path not in allowed and pattern.search(path.read_text())]
    assert offenders == [], offenders
