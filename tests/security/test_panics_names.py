"""Issue 11 item 17: hostile report *names* in ``metal-guard panics`` (and the gate's -v listing).

A report named with bytes that are not UTF-8 made ``panics`` die with exit 70 when stdout is
strict UTF-8 (launchd jobs, ``PYTHONIOENCODING=utf-8:strict``); a name with a newline or an
escape sequence could forge an output line. Names are now shown escaped, whatever the bytes and
whatever the stdout encoding, and the exit code is the verdict's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from report_factory import panic_report

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file names are bytes")


def _run(home: Path, reports: Path, encoding: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALGUARD_")}
    env.update(METALGUARD_HOME=str(home), METALGUARD_DIAGNOSTIC_REPORTS_DIRS=str(reports),
               PYTHONIOENCODING=f"{encoding}:strict", LC_ALL="C")
    return subprocess.run([sys.executable, "-m", "metal_guard", *args], env=env,
                          capture_output=True, timeout=120)


@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
def test_undecodable_and_control_names_never_crash_or_forge_lines(
    tmp_path: Path, metalguard_home: Path, encoding: str
) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    now = time.time()
    stamp = datetime.fromtimestamp(now - 540).strftime("%Y-%m-%d-%H%M%S").encode()
    names = [b"panic-full-" + stamp + b".\xff\xfe.panic",
             b"panic-full-" + stamp + b".\nFAKE 0 GPU kernel panic(s).panic",
             b"panic-full-" + stamp + b".\x1b[2J\xe2\x80\xae.panic"]
    for i, raw in enumerate(names):
        with open(os.path.join(os.fsencode(reports), raw), "w") as fh:
            fh.write(panic_report(now - 600 - i))
    for args in (("panics", "--all"), ("panics", "--json"), ("panic-gate", "-v")):
        proc = _run(metalguard_home, reports, encoding, *args)
        out = proc.stdout + proc.stderr
        assert proc.returncode == (2 if args[0] == "panic-gate" else 1), out
        assert b"Traceback" not in out and b"internal error" not in out
        assert b"\x1b" not in out and b"\xff" not in out
        assert not any(line.startswith(b"FAKE") for line in out.splitlines())
        if args == ("panics", "--all"):
            assert proc.stdout.startswith(b"3 GPU kernel panic(s)")
            assert b"\\xff\\xfe" in proc.stdout  # the bad bytes are shown, escaped


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(min_size=1, max_size=60).filter(lambda b: b"/" not in b and b"\x00" not in b))
def test_shown_is_single_line_printable_ascii_safe_for_any_name(raw: bytes) -> None:
    from metal_guard.cli.forensics import shown

    text = shown(os.fsdecode(raw))
    text.encode("utf-8")  # strict: no lone surrogates left
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    assert "\u2028" not in text and "\u202e" not in text
