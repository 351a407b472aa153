"""Issue 11, items 7 and 10: modes of what we create, and state never written through a link.

* every directory metal-guard creates is 0700 under umask 022 (each created parent too), every
  file 0600, tiny-model files included;
* an existing state dir with group/other bits is repaired to 0700; one that is a symlink or
  belongs to another user (a real second user) is refused;
* appends never follow a symlink or a hard link (O_NOFOLLOW; the link is moved aside).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _state_attack import chown_tree, other_user
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metal_guard import breadcrumbs, storage
from metal_guard.errors import StateFileError


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _write_everything() -> None:
    from metal_guard.breaker import CircuitBreaker, ingest_panics_jsonl
    from metal_guard.cadence import CadenceGuard
    from metal_guard.forensics.records import PanicRecord
    from metal_guard.heartbeat import publish_memory

    assert breadcrumbs.breadcrumb_with_meta("LOAD", "m", durable=False)
    CircuitBreaker(auto_ingest=False).record_failure("gpu_hang")
    ingest_panics_jsonl(records=[PanicRecord(path="/r/a.panic", timestamp=1.0)])
    CadenceGuard().mark_load("m")
    assert publish_memory({"active_bytes": 1}, force=True) is not None


def test_created_dirs_0700_and_files_0600_under_umask_022(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "a" / "b" / "home"
    monkeypatch.setenv("METALGUARD_HOME", str(home))
    with umask(0o022):
        _write_everything()
    dirs = [tmp_path / "a", tmp_path / "a" / "b", home, home / "state", home / "cache",
            home / "cache" / "heartbeats"]
    assert {str(d): oct(_mode(d)) for d in dirs} == {str(d): "0o700" for d in dirs}
    files = [p for p in home.rglob("*") if p.is_file()]
    assert len(files) >= 6
    assert {str(f): oct(_mode(f)) for f in files} == {str(f): "0o600" for f in files}


def test_an_existing_state_dir_with_loose_mode_is_repaired(metalguard_home: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    state = metalguard_home / "state"
    state.mkdir(mode=0o700)
    os.chmod(state, 0o777)
    os.chmod(metalguard_home, 0o755)
    with caplog.at_level("WARNING"):
        assert breadcrumbs.breadcrumb("X: y")
    assert _mode(state) == 0o700 and _mode(metalguard_home) == 0o700
    assert "repaired to 0700" in caplog.text


def test_a_state_dir_of_another_user_is_refused(metalguard_home: Path) -> None:
    from metal_guard.breaker import CircuitBreaker

    with other_user() as user:
        state = metalguard_home / "state"
        state.mkdir(mode=0o700)
        chown_tree(state, user)
        with pytest.raises(StateFileError, match="owned by uid"):
            CircuitBreaker(auto_ingest=False).record_failure("gpu_hang")
        assert not breadcrumbs.breadcrumb("X: y")
        assert list(state.iterdir()) == []
        os.lchown(state, 0, 0)


LINKABLE = ["home", "state", "cache", "heartbeats", "metal_breadcrumb.log", "panics.jsonl",
            "breaker.json", "cadence.json"]


def _ops() -> dict[str, Callable[[], object]]:
    from metal_guard.breaker import CircuitBreaker, ingest_panics_jsonl
    from metal_guard.cadence import CadenceGuard
    from metal_guard.forensics.records import PanicRecord
    from metal_guard.heartbeat import publish_memory

    return {
        "breadcrumb": lambda: breadcrumbs.breadcrumb_with_meta("LOAD", "m"),
        "ingest": lambda: ingest_panics_jsonl(records=[PanicRecord(path="/r/b.panic", timestamp=2.0)]),
        "breaker": lambda: CircuitBreaker(auto_ingest=False).record_failure("gpu_hang"),
        "cadence": lambda: CadenceGuard().mark_load("m"),
        "heartbeat": lambda: publish_memory({"active_bytes": 1}, force=True),
    }


def _tree(path: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(path.rglob("*"))}


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(linked=st.sampled_from(LINKABLE), op=st.sampled_from(sorted(_ops())),
       hard=st.booleans())
def test_nothing_is_ever_written_through_a_link(linked: str, op: str, hard: bool) -> None:
    base = Path(tempfile.mkdtemp(prefix="mg-links-"))
    old = os.environ.get("METALGUARD_HOME")
    try:
        home = base / "home"
        victim = base / "victim"  # what the attacker wants us to write into
        victim.mkdir()
        (victim / "passwd").write_text("root:x:0:0\n")
        os.environ["METALGUARD_HOME"] = str(home)
        (home / "state").mkdir(parents=True, mode=0o700)
        (home / "cache" / "heartbeats").mkdir(parents=True, mode=0o700)
        os.chmod(home, 0o700)
        os.chmod(home / "cache", 0o700)
        where = {"home": home, "state": home / "state", "cache": home / "cache",
                 "heartbeats": home / "cache" / "heartbeats"}.get(linked)
        if where is not None:  # a linked directory
            shutil.rmtree(where)
            where.symlink_to(victim, target_is_directory=True)
        else:
            target = home / "state" / linked
            if hard:
                os.link(victim / "passwd", target)
            else:
                target.symlink_to(victim / "passwd")
        before = _tree(victim)
        with contextlib.suppress(StateFileError):
            _ops()[op]()
        assert _tree(victim) == before
    finally:
        if old is not None:
            os.environ["METALGUARD_HOME"] = old
        shutil.rmtree(base, ignore_errors=True)


def test_a_symlinked_log_is_moved_aside_and_a_fresh_log_started(metalguard_home: Path,
                                                                tmp_path: Path) -> None:
    victim = tmp_path / "passwd"
    victim.write_text("root:x:0:0\n")
    state = storage.ensure_dir(metalguard_home / "state")
    (state / "metal_breadcrumb.log").symlink_to(victim)
    assert breadcrumbs.breadcrumb("LOAD: m")
    assert victim.read_text() == "root:x:0:0\n"
    log = state / "metal_breadcrumb.log"
    assert log.is_file() and not log.is_symlink() and _mode(log) == 0o600
    assert [c.tag for c in breadcrumbs.tail(5)] == ["LOAD"]
    assert next(state.glob("metal_breadcrumb.log.corrupt-*")).is_symlink()


def test_a_configured_log_path_that_is_not_a_regular_file_is_refused_not_moved(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    monkeypatch.setenv("METALGUARD_BREADCRUMB_PATH", str(fifo))
    assert breadcrumbs.breadcrumb("X: y") is False
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # outside our dirs nothing is moved


def test_tiny_model_files_are_private_and_leftover_builds_swept(tmp_path: Path) -> None:
    from metal_guard.tinymodel import build_tiny_lm

    dest = tmp_path / "models" / "tiny"
    leftover = tmp_path / "models" / ".tiny.building-dead1234"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    with umask(0o022):
        build_tiny_lm(dest, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    assert not leftover.exists()
    entries = [dest, *dest.rglob("*")]
    modes = {str(p): oct(_mode(p)) for p in entries}
    assert modes == {str(p): ("0o700" if p.is_dir() else "0o600") for p in entries}
