"""forensics.feedback (R8): Markdown for Apple's Feedback Assistant."""

from __future__ import annotations

import re

import pytest
from report_factory import FIXTURES

from metal_guard.forensics.feedback import format_panic_for_apple_feedback
from metal_guard.forensics.reports import parse_report_file


@pytest.fixture
def record():  # type: ignore[no-untyped-def]
    rec = parse_report_file(FIXTURES / "panic-full-2026-08-20-070924.0002.panic")
    assert rec is not None
    return rec


def test_report_sections_and_facts(record) -> None:  # type: ignore[no-untyped-def]
    md = format_panic_for_apple_feedback(
        record, breadcrumb_tail=[f"[t] GEN: step {i}" for i in range(100)], max_breadcrumb_lines=10,
        system={"mlx_version": "0.32.4", "gpu": {"family": "M4", "device_name": "Apple M4"},
                "gate": {"recent_panics_24h": 1, "recent_panics_72h": 2}})
    assert md.splitlines()[0] == ('# Kernel panic in IOGPUFamily: completeMemory() prepare count '
                                  'underflow @IOGPUMemory.cpp:550')
    for heading in ("## Summary", "## Panic string", "## System", "## Steps to reproduce",
                    "## What metal-guard observed", "## Related public reports"):
        assert heading in md
    assert "**macOS:** macOS 26.4 (25E246)" in md
    assert "**IOGPUFamily:** 130.13" in md and "**MLX:** 0.32.4" in md and "Apple M4 M4" in md
    assert "Python (pid 50218)" in md
    assert "https://github.com/ml-explore/mlx/issues/" in md
    crumbs = re.findall(r"GEN: step (\d+)", md)
    assert crumbs == [str(i) for i in range(90, 100)]
    assert "1 / 2" in md


def test_mapping_input_reproducer_and_redaction(record) -> None:  # type: ignore[no-untyped-def]
    data = record.to_dict()
    data["path"] = "/Users/alice/Library/Logs/DiagnosticReports/x.panic"
    md = format_panic_for_apple_feedback(data, reproducer=["load /Users/alice/models/m", "generate"],
                                         breadcrumb_tail=["[t] LOAD: /home/bob/m"])
    assert "alice" not in md and "bob" not in md and "/Users/<user>/models/m" in md
    assert "1. load" in md and "2. generate" in md
    assert "alice" in format_panic_for_apple_feedback(data, redact_home=False)


def test_backticks_in_the_panic_text_cannot_break_the_fence(record) -> None:  # type: ignore[no-untyped-def]
    data = record.to_dict()
    data["excerpt"] = "panic(cpu 0 caller 0x1): ```` weird\n```\n"
    md = format_panic_for_apple_feedback(data, include_breadcrumb=False)
    assert "`````text" in md


def test_rejects_junk() -> None:
    with pytest.raises(TypeError):
        format_panic_for_apple_feedback(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        format_panic_for_apple_feedback({"no": "timestamp", "ts": "x"})
