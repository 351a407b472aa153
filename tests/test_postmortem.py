"""forensics.postmortem (L12): the bundle, caps, sentinel, and no MLX import during cooldown."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from report_factory import PENDING_219, UNDERFLOW_550, WATCHDOG, write_metal_abort, write_panic

from metal_guard.breadcrumbs import breadcrumb_with_meta
from metal_guard.forensics.gate import evaluate_panic_cooldown, read_panic_sentinel
from metal_guard.forensics.postmortem import run_postmortem
from metal_guard.settings import get_settings

H = 3600.0


def test_bundle_with_panics(rdir: Path, tmp_path: Path) -> None:
    now = time.time()
    for i in range(7):
        write_panic(rdir, now - (i + 1) * H, PENDING_219 if i % 2 else UNDERFLOW_550)
    write_panic(rdir, now - 30 * H)  # older than 24 h: not copied
    write_panic(rdir, now - H, WATCHDOG)  # not a GPU panic: not copied
    write_metal_abort(rdir, now - 2 * H)
    for i in range(600):
        breadcrumb_with_meta("GEN", f"step {i}", durable=False)
    archive = get_settings().state_file("panics.jsonl")
    archive.write_text('{"ts": 1, "signature": "prepare_count_underflow"}\n')

    out = tmp_path / "bundle"
    result = run_postmortem(out, now=now)
    assert result["status"] == "ok" and result["panic_count"] == 5 and result["abort_count"] == 1
    assert len(list((out / "panics").iterdir())) == 5
    assert len(list((out / "aborts").iterdir())) == 1
    tail = (out / "breadcrumb_tail.log").read_text().splitlines()
    assert len(tail) == 500 and tail[-1].endswith("step 599")
    assert (out / "panics.jsonl").read_text() == archive.read_text()
    index = (out / "index.md").read_text()
    assert "Next steps" in index and "pending_memory_set" in index
    assert "## Panic string" in (out / "apple_feedback.md").read_text()
    system = json.loads((out / "system.json").read_text())
    assert system["mlx_import_policy"].startswith("refused")
    assert json.loads((out / "postmortem.json").read_text())["panic_count"] == 5
    # the sentinel keeps the gate closed for METALGUARD_POSTMORTEM_SENTINEL_H from now
    sentinel = read_panic_sentinel()
    assert sentinel is not None and sentinel["cooldown_until_ts"] == pytest.approx(now + 2 * H)
    assert evaluate_panic_cooldown(now=now + 1.5 * H).exit_code == 2


def test_reports_are_capped_with_a_trailer(rdir: Path, tmp_path: Path) -> None:
    now = time.time()
    big = write_panic(rdir, now - H, padding=6 * 1024 * 1024)
    result = run_postmortem(tmp_path / "out", now=now, max_report_bytes=5 * 1024 * 1024)
    [copy] = list((tmp_path / "out" / "panics").iterdir())
    data = copy.read_bytes()
    assert copy.name == big.name
    assert 5 * 1024 * 1024 < len(data) < 5 * 1024 * 1024 + 1000
    assert b"[metal-guard: truncated at 5242880 of" in data[-300:]
    assert result["panic_count"] == 1


def test_no_panic_no_sentinel(rdir: Path, tmp_path: Path) -> None:
    result = run_postmortem(tmp_path / "quiet")
    assert result["panic_count"] == 0 and result["sentinel"] is None
    assert read_panic_sentinel() is None
    assert "No GPU kernel panic" in (tmp_path / "quiet" / "index.md").read_text()


def test_kill_switch(rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_panic(rdir, time.time() - H)
    monkeypatch.setenv("METALGUARD_POSTMORTEM_DISABLED", "1")
    assert run_postmortem(tmp_path / "x")["status"] == "disabled"
    assert not (tmp_path / "x").exists() and read_panic_sentinel() is None


def test_output_path_that_is_a_file_is_refused(rdir: Path, tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(NotADirectoryError):
        run_postmortem(target)
    assert target.read_text() == "keep me"


def test_postmortem_never_imports_mlx_during_cooldown(rdir: Path, tmp_path: Path) -> None:
    write_panic(rdir, time.time() - 600)
    code = ("import sys; from metal_guard.forensics.postmortem import run_postmortem; "
            f"r = run_postmortem({str(tmp_path / 'b')!r}); "
            "print(r['panic_count'], 'mlx.core' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "1 False", proc.stderr
