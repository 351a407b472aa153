"""Issue 11, items 6, 7 (reads) and 20: whatever sits where a state file should be — junk,
JSON nested 100k deep, a file over the size cap, a directory, a FIFO, a symlink — every state
file's check quarantines it and goes on with fresh state: no RecursionError, no hang, no
unbounded read, no link followed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _state_attack import STATE_FILES, run_op
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metal_guard import storage


@contextlib.contextmanager
def fresh_home() -> Iterator[Path]:
    """A new METALGUARD_HOME for one hypothesis example (fixtures are per test, not example)."""
    old = os.environ.get("METALGUARD_HOME")
    home = Path(tempfile.mkdtemp(prefix="mg-corrupt-"))
    os.environ["METALGUARD_HOME"] = str(home)
    try:
        (home / "state").mkdir(mode=0o700)
        yield home / "state"
    finally:
        if old is None:
            os.environ.pop("METALGUARD_HOME", None)
        else:
            os.environ["METALGUARD_HOME"] = old
        shutil.rmtree(home, ignore_errors=True)


def _nested(depth: int, opener: str) -> bytes:
    return (opener * depth).encode()


bad_content = st.one_of(
    st.binary(max_size=300),
    st.builds(_nested, st.integers(min_value=storage.MAX_NESTING + 1, max_value=200_000),
              st.sampled_from(["[", '{"a":', '[{"b":'])),
    st.builds(lambda d: (("[" * d) + ("]" * d)).encode(),
              st.integers(min_value=storage.MAX_NESTING + 1, max_value=5000)),
    st.sampled_from([b"", b"   \n", b"[]", b"1", b'"x"', b"null", b"1" * 5000, b"\xff\xfe{}",
                     b'{"cooldown_until": "soon"}', b"NaN"]),
)


def _file_ok_after(path: Path) -> None:
    """After the check, the file is absent or holds well-formed state again."""
    if not path.exists():
        return
    assert path.is_file() and not path.is_symlink()
    text = path.read_bytes()
    if path.suffix == ".jsonl":  # every complete line is a record (an unterminated tail may be
        for line in text.split(b"\n")[:-1]:  # an append in progress: skipped, not repaired)
            if line.strip():
                storage.loads_bounded(line)
    else:
        assert isinstance(storage.loads_bounded(text), dict)


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(STATE_FILES)), content=bad_content)
def test_any_bad_content_in_any_state_file_is_quarantined(name: str, content: bytes) -> None:
    with fresh_home() as state:
        path = state / STATE_FILES[name][0]
        path.write_bytes(content)
        assert run_op(name) == "ok"
        _file_ok_after(path)
        assert run_op(name) in ("ok", "CadenceViolation")  # the fresh state works


@pytest.mark.parametrize("name", sorted(STATE_FILES))
@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink", "oversize"])
def test_foreign_objects_at_a_state_path(name: str, kind: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    with fresh_home() as state:
        path = state / STATE_FILES[name][0]
        if kind == "directory":
            path.mkdir()
            (path / "inner").write_text("x")
        elif kind == "fifo":
            os.mkfifo(path)  # opening it for reading must not block
        elif kind == "symlink":
            path.symlink_to(outside)
        else:  # a valid-looking file far over the cap, sparse so the test stays cheap
            with path.open("wb") as fh:
                fh.write(b'{"a": "' if name != "panics" else b"")
                fh.truncate(storage.MAX_JSONL_BYTES * 40)
        assert run_op(name) == "ok"
        _file_ok_after(path)
        if name != "panics" or kind != "oversize":  # a JSONL file is tail-read, not moved
            assert list(state.glob(f"{path.name}.corrupt-*")), "not quarantined"
    assert outside.read_text() == "precious\n"


def test_a_300mb_cadence_file_does_not_blow_up_status(metalguard_home: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A valid 300 MB state file used to be read whole (617 MB RSS); now it is oversize."""
    state = metalguard_home / "state"
    state.mkdir(mode=0o700)
    big = state / "cadence.json"
    with big.open("wb") as fh:  # valid JSON: {"m": 1.0, "pad": "     ...     "}
        fh.write(b'{"m": 1.0, "pad": "')
        fh.seek(300_000_000)
        fh.write(b'"}')
    import tracemalloc

    from metal_guard.cli import main

    tracemalloc.start()
    try:
        code = main(["--json", "status"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code in (0, 1)
    assert peak < 64_000_000, f"status allocated {peak} bytes"
    assert list(state.glob("cadence.json.corrupt-*"))
    assert json.loads(capsys.readouterr().out)["cadence"] is not None


def test_scan_cache_nested_or_oversize_is_rebuilt(tmp_path: Path, metalguard_home: Path) -> None:
    from metal_guard.forensics.scancache import CACHE_FILE, ScanCache

    path = tmp_path / CACHE_FILE
    for content in (b"[" * 100_000, b'{"format": "' + b" " * (40 << 20) + b'"}'):
        path.write_bytes(content)
        cache = ScanCache.load(path)
        assert cache.entries == {}
        cache.put("/r/x.panic", "1:2:3:4", None)
        cache.save()
        assert json.loads(path.read_bytes())["entries"]

