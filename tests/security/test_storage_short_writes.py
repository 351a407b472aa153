"""Issue 11, item 5: short writes on a full disk. A record is appended whole or not at all (a
loud failure), readers skip torn lines, and a record never continues a torn line.

Real short writes come from a real 64 KiB tmpfs (root only; skipped otherwise) and from
``RLIMIT_FSIZE`` in a subprocess (a write crossing the limit is cut short, the next fails).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metal_guard import breadcrumbs, storage
from metal_guard.errors import StateFileError

PAGE = 4096


@pytest.fixture(scope="module")
def tiny_fs() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = Path(tempfile.mkdtemp(prefix="mg-full-disk-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        with contextlib.suppress(OSError):
            mnt.rmdir()


@contextlib.contextmanager
def home_on(mnt: Path) -> Iterator[Path]:
    """An empty METALGUARD_HOME on the small filesystem (for one hypothesis example)."""
    for entry in mnt.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    old = os.environ.get("METALGUARD_HOME")
    os.environ["METALGUARD_HOME"] = str(mnt / "home")
    try:
        yield storage.ensure_dir(mnt / "home" / "state")
    finally:
        os.environ["METALGUARD_HOME"] = old or ""


def _fill(mnt: Path, leave_pages: int) -> None:
    """Use up the filesystem except ``leave_pages`` pages."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0" * PAGE) > 0:
                pass
    finally:
        os.close(fd)
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave_pages * PAGE))


def test_a_short_jsonl_append_is_undone_and_loud(tiny_fs: Path) -> None:
    with home_on(tiny_fs) as state:
        _fill(tiny_fs, 1)
        path = state / "panics.jsonl"
        records = [{"i": i, "pad": "x" * 980} for i in range(10)]
        written = []
        with pytest.raises(StateFileError, match=r"only \d+ of \d+ bytes could be written"):
            for rec in records:
                storage.append_jsonl(path, rec)
                written.append(rec)
        assert 1 <= len(written) < len(records)
        data = path.read_bytes()
        assert data.endswith(b"\n")
        assert [json.loads(line) for line in data.splitlines()] == written  # whole records only
        (tiny_fs / "filler").unlink()  # space again: the next record starts on its own line
        storage.append_jsonl(path, {"after": True})
        assert storage.read_jsonl(path) == [*written, {"after": True}]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=40),
       leave=st.integers(min_value=0, max_value=3),
       text=st.text(min_size=1, max_size=20))
def test_full_disk_property_file_is_exactly_the_whole_records_reported(
        tiny_fs: Path, sizes: list[int], leave: int, text: str) -> None:
    with home_on(tiny_fs) as state:
        _fill(tiny_fs, leave)
        jsonl, log = state / "panics.jsonl", state / "metal_breadcrumb.log"
        ok_records: list[dict[str, object]] = []
        ok_payloads: list[str] = []
        for i, size in enumerate(sizes):
            rec = {"i": i, "pad": text * (size // max(1, len(text)))}
            try:
                storage.append_jsonl(jsonl, rec, fsync=False)
                ok_records.append(rec)
            except StateFileError:
                pass
            payload = f"{text} {i} " + "y" * size
            if breadcrumbs.breadcrumb_with_meta("SUBPROC_POST", payload, durable=False,
                                                pid=i, log_path=log):
                ok_payloads.append(payload)
        assert storage.read_jsonl(jsonl) == ok_records
        if jsonl.exists():
            assert jsonl.read_bytes() == b"".join(
                (json.dumps(r, sort_keys=True) + "\n").encode() for r in ok_records)
        lines = breadcrumbs.read_lines(1000, path=log)
        assert [breadcrumbs.parse_line(line).payload for line in lines] == ok_payloads  # type: ignore[union-attr]
        assert not log.exists() or log.read_bytes().endswith(b"\n") or not log.read_bytes()


RLIMIT_SCRIPT = r"""
import json, os, resource, signal, sys
from pathlib import Path
from metal_guard import breadcrumbs, storage
from metal_guard.errors import StateFileError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
state = Path(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (4500, resource.RLIM_INFINITY))
out = {"jsonl": [], "crumbs": []}
for i in range(8):
    try:
        storage.append_jsonl(state / "panics.jsonl", {"i": i, "pad": "x" * 990})
        out["jsonl"].append(i)
    except StateFileError as exc:
        out["jsonl_error"] = str(exc)
    ok = breadcrumbs.breadcrumb_with_meta("SUBPROC_POST", "m" * 990, pid=i,
                                          log_path=state / "metal_breadcrumb.log")
    if ok:
        out["crumbs"].append(i)
print(json.dumps(out))
"""


def test_rlimit_fsize_short_writes_are_whole_or_loud(metalguard_home: Path) -> None:
    state = storage.ensure_dir(metalguard_home / "state")
    done = subprocess.run([sys.executable, "-c", RLIMIT_SCRIPT, str(state)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["jsonl"] == [0, 1, 2, 3] and "bytes could be written" in out["jsonl_error"]
    assert [r["i"] for r in storage.read_jsonl(state / "panics.jsonl")] == [0, 1, 2, 3]
    assert (state / "panics.jsonl").stat().st_size < 4500  # the partial record was cut off
    lines = breadcrumbs.read_lines(100, path=state / "metal_breadcrumb.log")
    assert [breadcrumbs.parse_line(x).meta["pid"] for x in lines] == [  # type: ignore[union-attr]
        str(i) for i in out["crumbs"]]
    assert "breadcrumb not written" in done.stderr  # loud, once


def test_a_torn_line_left_by_a_crash_is_never_continued_or_parsed(metalguard_home: Path) -> None:
    from metal_guard.forensics.orphans import pair_breadcrumbs

    log = storage.ensure_dir(metalguard_home / "state") / "metal_breadcrumb.log"
    pre = breadcrumbs.format_line("SUBPROC_PRE", "model-x", pid=4242, create_time="1.5")
    post = breadcrumbs.format_line("SUBPROC_POST", "model-x", pid=4242, outcome="ok")
    # a crash tore the POST after "model": it would read as a POST of model "mo", or glue
    # itself to the next record
    log.write_text(pre + "\n" + post[: post.index("model-x") + 2])
    assert breadcrumbs.read_lines(10, path=log) == [pre]  # the unterminated tail is skipped
    assert breadcrumbs.breadcrumb_with_meta("SUBPROC_POST", "model-x", pid=4242, log_path=log)
    lines = breadcrumbs.read_lines(10, path=log)
    assert len(lines) == 3 and breadcrumbs.parse_line(lines[1]) is None  # the fragment
    assert pair_breadcrumbs(lines) == []  # the real POST closes the PRE

    jsonl = log.with_name("panics.jsonl")
    jsonl.write_bytes(b'{"i": 0}\n{"i": 1, "pad": "xx')
    storage.append_jsonl(jsonl, {"i": 2})
    assert storage.read_jsonl_counted(jsonl) == ([{"i": 0}, {"i": 2}], 1)
