"""The pytest plugin: the ``metal_guard_installed`` fixture and the leak check.

Each case runs a real pytest in a subprocess on a small test file, with plugin autoloading off
and the plugin loaded explicitly (``-p metal_guard.pytest_plugin``), so the result does not
depend on whether the dev install has registered the entry point yet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = '''
import pytest
import metal_guard


@pytest.mark.metal_guard(adapters=["mlx_lm"], cadence=False)
def test_with_fixture(metal_guard_installed):
    assert metal_guard_installed["installed"] is True
    assert metal_guard_installed["options"]["cadence"] is False
    from metal_guard import installer as install
    assert install.is_installed()


def test_leaks():
    from metal_guard import installer as install
    install.install(adapters=["mlx_lm"])


def test_after_the_leak_starts_clean():
    from metal_guard import installer as install
    assert not install.is_installed()


def test_cleans_up_itself():
    from metal_guard import installer as install
    install.install()
    install.uninstall()
'''


def run_pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALGUARD_")}
    env["METALGUARD_HOME"] = str(tmp_path / "home")
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "metal_guard.pytest_plugin", "-q", "-rA",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py"), *args],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_fixture_and_leak_check_fail_mode(tmp_path: Path) -> None:
    proc = run_pytest(tmp_path)
    out = proc.stdout
    assert proc.returncode == 1, out
    assert "PASSED test_sample.py::test_with_fixture" in out
    assert "ERROR test_sample.py::test_leaks" in out
    assert "left metal-guard installed" in out
    assert "PASSED test_sample.py::test_after_the_leak_starts_clean" in out
    assert "PASSED test_sample.py::test_cleans_up_itself" in out


def test_leak_check_warn_and_off(tmp_path: Path) -> None:
    proc = run_pytest(tmp_path, "-o", "metal_guard_leak_check=warn")
    assert proc.returncode == 0, proc.stdout
    assert "left metal-guard installed" in proc.stdout  # in the warnings summary
    proc = run_pytest(tmp_path, "--metal-guard-leak-check=off")
    # off: the leak is not cleaned up, so the next test sees metal-guard still installed
    assert "FAILED test_sample.py::test_after_the_leak_starts_clean" in proc.stdout


def test_loading_the_plugin_imports_nothing_heavy() -> None:
    code = textwrap.dedent("""
        import json, sys
        before = set(sys.modules)
        import metal_guard.pytest_plugin
        new = sorted(m for m in set(sys.modules) - before if not m.startswith(("_pytest", "pytest",
                     "pluggy", "iniconfig", "packaging", "py", "_py")))
        print(json.dumps(new))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    new = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not [m for m in new if m.startswith(("wrapt", "mlx", "metal_guard.installer",
                                                 "metal_guard.settings", "metal_guard.adapters"))], new
