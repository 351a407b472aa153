"""`metal-guard status` exits with the worst health it shows, in every format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from metal_guard import status
from metal_guard.cli import main

FORMATS = (["status"], ["status", "--json"], ["status", "--format", "json"],
           ["status", "--format", "prometheus"])


@pytest.mark.parametrize("argv", FORMATS, ids=lambda a: " ".join(a))
def test_gate_broken_exits_3_in_every_format(argv: list[str], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "not-a-dir"
    bogus.write_text("")
    monkeypatch.setenv("METALGUARD_DIAGNOSTIC_REPORTS_DIRS", str(bogus))
    assert main(argv) == 3
    out = capsys.readouterr().out
    if "--json" in argv or "json" in argv:
        assert json.loads(out)["health"] == {"exit_code": 3, "label": "GATE BROKEN"}
    elif "prometheus" not in argv:
        assert "[GATE BROKEN]" in out


@pytest.mark.parametrize("argv", FORMATS, ids=lambda a: " ".join(a))
def test_a_failed_gate_collector_is_gate_broken_not_ok(argv: list[str],
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The gate's own collector raising means the gate could not evaluate: 3, not 1 or 0."""
    def broken(ctx: dict[str, Any]) -> dict[str, Any]:
        raise OSError("sentinel unreadable")

    monkeypatch.setitem(status.COLLECTORS, "panic_cooldown", broken)
    assert main(argv) == 3
    out = capsys.readouterr().out
    if "--json" in argv or "json" in argv:
        assert json.loads(out)["health"]["label"] == "GATE BROKEN"
    elif "prometheus" not in argv:
        assert "[GATE BROKEN]" in out and "gate       BROKEN" in out


def test_healthy_and_warn_exit_codes_match_the_label(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 0 and "[OK]" in capsys.readouterr().out

    def broken(ctx: dict[str, Any]) -> dict[str, Any]:
        raise OSError("lock sidecar unreadable")

    monkeypatch.setitem(status.COLLECTORS, "lock", broken)
    assert main(["status"]) == 1 and "[WARN]" in capsys.readouterr().out
