"""Post-import hooks for modules run as scripts (``python -m pkg.mod``, ``runpy.run_module``).

A small package written to ``tmp_path`` stands in for ``mlx_lm.server``: its ``__main__``
block calls a function the hook replaces. Each case runs in a fresh interpreter, through
``runpy._run_module_as_main`` — the function ``python -m`` itself calls.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TOOL = '''
"""A tool that is also a module."""
from __future__ import annotations

def work() -> str:
    return "original"

if __name__ == "__main__":
    answer: str = work()
    print("MAIN", answer, __name__, __spec__.name, __loader__.__class__.__name__)
print("AFTER-BLOCK", work())
'''

HOOK = '''
import sys
from metal_guard import _import_hooks
fired = []
def hook(module):
    fired.append(_import_hooks.module_name(module))
    module.work = lambda: "hooked"
_import_hooks.register("mgdemo.tool", hook)
'''


@pytest.fixture
def package(tmp_path: Path) -> Path:
    pkg = tmp_path / "mgdemo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tool.py").write_text(TOOL)
    (pkg / "plain.py").write_text("def work():\n    return 'original'\nprint('PLAIN', work())\n")
    return tmp_path


def _py(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALGUARD_")}
    env["PYTHONPATH"] = str(cwd)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=60)


def test_main_block_runs_after_the_hooks(package: Path) -> None:
    proc = _py(HOOK + "import runpy; runpy._run_module_as_main('mgdemo.tool')\nprint('FIRED', fired)",
               package)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # the __future__ import still applies to the split-off block (annotation not evaluated),
    # __loader__ is the real loader, not our proxy
    assert lines[0] == "MAIN hooked __main__ mgdemo.tool SourceFileLoader"
    assert lines[1] == "AFTER-BLOCK hooked"
    assert lines[2] == "FIRED ['mgdemo.tool']"


def test_without_hooks_the_module_runs_untouched(package: Path) -> None:
    proc = _py("import runpy; runpy._run_module_as_main('mgdemo.tool')", package)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "MAIN original __main__ mgdemo.tool SourceFileLoader"


def test_already_imported_module_run_as_main_is_hooked_too(package: Path) -> None:
    """``python -m mlx_lm.generate``: the package imports the module before runpy runs it."""
    proc = _py(HOOK + "import mgdemo.tool, runpy; runpy._run_module_as_main('mgdemo.tool')", package)
    assert proc.returncode == 0, proc.stderr
    assert "MAIN hooked __main__ mgdemo.tool" in proc.stdout


def test_run_module_into_a_temp_module_is_hooked(package: Path) -> None:
    code = HOOK + "import runpy; g = runpy.run_module('mgdemo.tool', run_name='__main__', alter_sys=True)"
    proc = _py(code, package)
    assert proc.returncode == 0, proc.stderr
    assert "MAIN hooked" in proc.stdout


def test_module_without_main_block_gets_hooks_after_its_body(package: Path) -> None:
    code = HOOK.replace("mgdemo.tool", "mgdemo.plain") + (
        "import runpy; runpy._run_module_as_main('mgdemo.plain')\nprint('FIRED', fired)")
    proc = _py(code, package)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["PLAIN original", "FIRED ['mgdemo.plain']"]


def test_sourceless_module_runs_unguarded_with_a_warning(package: Path) -> None:
    import py_compile

    src = package / "mgdemo" / "tool.py"
    py_compile.compile(str(src), cfile=str(package / "mgdemo" / "tool.pyc"))
    src.unlink()
    proc = _py(HOOK + "import runpy; runpy._run_module_as_main('mgdemo.tool')", package)
    assert proc.returncode == 0, proc.stderr
    assert "MAIN original" in proc.stdout
    assert "NOT guarded" in proc.stderr and "mgdemo.tool" in proc.stderr


def test_unregistering_the_last_hook_restores_runpy(package: Path) -> None:
    code = HOOK + textwrap.dedent("""
        import runpy
        wrapped = runpy._run_code is not _import_hooks._runpy_original
        _import_hooks.unregister("mgdemo.tool", hook)
        print(wrapped, _import_hooks.runpy_guarded(), runpy._run_code.__module__)
    """)
    proc = _py(code, package)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False", "runpy"]
