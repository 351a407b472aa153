from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from metal_guard import breadcrumbs
from metal_guard.settings import get_settings


def test_line_format_and_parse_roundtrip() -> None:
    now = datetime(2026, 11, 25, 19, 7, 39, 123456, tzinfo=UTC)
    line = breadcrumbs.format_line("subproc_pre", "mlx-community/x | y", now=now, pid=42, b="two words")
    assert line == ("[2026-11-25T19:07:39.123456+00:00] SUBPROC_PRE: mlx-community/x \\x7c y"
                    " | b=two\\x20words pid=42")
    parsed = breadcrumbs.parse_line(line)
    assert parsed is not None
    assert parsed.ts == now and parsed.tag == "SUBPROC_PRE"
    assert parsed.payload == "mlx-community/x | y"
    assert parsed.meta == {"b": "two words", "pid": "42"}


def test_legacy_seed_lines_parse() -> None:
    parsed = breadcrumbs.parse_line("[2026-04-23 03:14:00] SUBPROC_PRE: gemma")
    assert parsed is not None and parsed.tag == "SUBPROC_PRE" and parsed.payload == "gemma"
    assert parsed.ts.tzinfo is not None


@pytest.mark.parametrize("junk", ["", "hello", "[not a time] TAG: x", "[2026-01-01T00:00:00] lower: x"])
def test_junk_does_not_parse(junk: str) -> None:
    assert breadcrumbs.parse_line(junk) is None


def test_write_goes_to_state_dir_and_tail_reads_it() -> None:
    assert breadcrumbs.breadcrumb("LOAD: my-model START")
    assert breadcrumbs.breadcrumb_with_meta("UNLOAD", "my-model", active_bytes=10, durable=False)
    path = get_settings().resolved_breadcrumb_path
    assert path.is_file() and path.parent == get_settings().state_dir
    crumbs = breadcrumbs.tail(5)
    assert [c.tag for c in crumbs] == ["LOAD", "UNLOAD"]
    assert crumbs[0].payload == "my-model START"
    assert crumbs[1].meta == {"active_bytes": "10"}


def test_not_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    breadcrumbs.breadcrumb("x")
    assert not (tmp_path / "logs").exists()


def test_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_BREADCRUMB_MAX_BYTES", "4096")
    for i in range(200):
        breadcrumbs.breadcrumb_with_meta("TICK", str(i), durable=False)
    path = get_settings().resolved_breadcrumb_path
    assert path.stat().st_size <= 4096 + 200
    assert path.with_name(path.name + ".1").exists()
    assert breadcrumbs.tail(3)[-1].payload == "199"


def test_write_failure_never_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert breadcrumbs.breadcrumb("X: y", log_path=blocker / "sub" / "log") is False


def test_durable_write_fsyncs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    breadcrumbs.breadcrumb_with_meta("FREQ", durable=False)
    assert calls == []
    breadcrumbs.breadcrumb_with_meta("RARE")
    assert len(calls) == 1


@pytest.mark.parametrize("ts", ["0001-01-01 00:00:00", "9999-12-31 23:59:59"])
def test_extreme_legacy_timestamps_do_not_raise(ts: str) -> None:
    parsed = breadcrumbs.parse_line(f"[{ts}] TAG: x")
    assert parsed is None or parsed.tag == "TAG"


def test_meta_named_path_is_metadata_not_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert breadcrumbs.breadcrumb_with_meta("REQ", "x", path="sequential")
    assert not (tmp_path / "sequential").exists()
    assert breadcrumbs.tail(1)[-1].meta == {"path": "sequential"}
