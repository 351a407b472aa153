"""``METALGUARD_CI_NO_SKIPS=1`` (set by ``.ci/run``) makes any skip fail the session.

A real pytest session runs in a child process over a small test directory, with this suite's
``conftest.py`` loaded as a plugin (``-p conftest``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SKIPPING = {
    "test_mixed.py": """
        import pytest

        def test_passes():
            assert True

        def test_skips_inside():
            pytest.skip("the feature this hides")

        @pytest.mark.skipif(True, reason="a condition that is always true")
        def test_skipif():
            pass

        @pytest.mark.xfail(reason="known bug", strict=True)
        def test_xfail():
            raise AssertionError
    """,
    "test_module_skip.py": """
        import pytest

        pytest.importorskip("no_such_module_for_this_test")

        def test_never_runs():
            pass
    """,
}
CLEAN = {
    "test_clean.py": """
        import pytest

        def test_passes():
            assert True

        @pytest.mark.xfail(reason="known bug", strict=True)
        def test_xfail():
            raise AssertionError
    """,
}


def _session(tmp_path: Path, files: dict[str, str], *, no_skips: bool) -> subprocess.CompletedProcess[str]:
    for name, body in files.items():
        (tmp_path / name).write_text(textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if k != "METALGUARD_CI_NO_SKIPS"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if no_skips:
        env["METALGUARD_CI_NO_SKIPS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q",
         "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )


def test_a_skip_fails_the_session_and_every_reason_is_listed(tmp_path: Path) -> None:
    proc = _session(tmp_path, SKIPPING, no_skips=True)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "METALGUARD_CI_NO_SKIPS=1: 3 skipped, and a skip fails this run" in out
    assert "test_mixed.py::test_skips_inside: Skipped: the feature this hides" in out
    assert "test_mixed.py::test_skipif: Skipped: a condition that is always true" in out
    assert "test_module_skip.py: Skipped: could not import 'no_such_module_for_this_test'" in out
    assert "test_xfail" not in out.split("skipped, and a skip fails this run")[1]  # xfail is no skip


def test_without_the_variable_a_skip_is_only_reported(tmp_path: Path) -> None:
    proc = _session(tmp_path, SKIPPING, no_skips=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "METALGUARD_CI_NO_SKIPS" not in proc.stdout
    assert "3 skipped" in proc.stdout


def test_a_session_without_skips_passes_and_says_so(tmp_path: Path) -> None:
    proc = _session(tmp_path, CLEAN, no_skips=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "METALGUARD_CI_NO_SKIPS=1: no test was skipped" in proc.stdout
