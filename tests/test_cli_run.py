"""``metal-guard run``: command resolution, the interpreter check, the child's environment."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

from metal_guard.cli import run as run_cmd


def _args(**kw: object) -> argparse.Namespace:
    base = {"adapters": None, "disabled_adapters": None, "mode": None, "strict": False,
            "quiet": False, "shim": False, "command": []}
    base.update(kw)
    return argparse.Namespace(**base)


def test_bin_dir_comes_before_path(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    fake = other / "python"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    found = run_cmd.resolve_command("python", str(other))
    assert found is not None and Path(found).parent == Path(run_cmd.bin_dir())
    assert run_cmd.resolve_command("no-such-command-mg", str(other)) is None
    assert run_cmd.resolve_command(str(fake), "") == str(fake)


def test_python_of_reads_the_shebang(tmp_path: Path) -> None:
    script = tmp_path / "tool"
    script.write_text("#!/opt/venv/bin/python3.12\nprint()\n")
    assert run_cmd.python_of(str(script), "") == "/opt/venv/bin/python3.12"
    script.write_text("#!/usr/bin/env -S python3 -u\n")
    assert run_cmd.python_of(str(script), os.path.dirname(sys.executable)) == \
        os.path.join(os.path.dirname(sys.executable), "python3")
    script.write_text("#!/bin/bash\necho\n")
    assert run_cmd.python_of(str(script), "") is None
    binary = tmp_path / "blob"
    binary.write_bytes(b"\x7fELF" + b"\x00" * 64)
    assert run_cmd.python_of(str(binary), "") is None
    assert run_cmd.python_of("/usr/bin/python3.11", "") == "/usr/bin/python3.11"


def test_this_interpreter_can_import_metal_guard_and_a_bare_one_cannot() -> None:
    env = dict(os.environ)
    assert run_cmd.can_import_metal_guard(sys.executable, env) is True
    base = getattr(sys, "_base_executable", sys.executable)
    if os.path.abspath(base) == os.path.abspath(sys.executable):
        pytest.skip("not running in a venv: no bare interpreter to compare with")
    assert run_cmd.can_import_metal_guard(base, {k: v for k, v in env.items() if k != "PYTHONPATH"}) is False


def test_announce_is_on_by_default_and_q_turns_it_off() -> None:
    env, _ = run_cmd.build_env(_args(), base={"PATH": "/usr/bin"})
    assert env["METALGUARD_ANNOUNCE"] == "1" and env["METALGUARD_AUTOLOAD"] == "1"
    env, _ = run_cmd.build_env(_args(quiet=True), base={"PATH": "/usr/bin", "METALGUARD_ANNOUNCE": "1"})
    assert env["METALGUARD_ANNOUNCE"] == "0"
    env, _ = run_cmd.build_env(_args(), base={"PATH": "/usr/bin", "METALGUARD_ANNOUNCE": "0"})
    assert env["METALGUARD_ANNOUNCE"] == "0"  # an explicit choice in the environment stands


def test_a_venv_bin_dir_goes_first_on_the_childs_path() -> None:
    env, _ = run_cmd.build_env(_args(), base={"PATH": "/usr/bin:/bin"})
    parts = env["PATH"].split(os.pathsep)
    if sys.prefix != sys.base_prefix:
        assert parts == [run_cmd.bin_dir(), "/usr/bin", "/bin"]
        again, _ = run_cmd.build_env(_args(), base={"PATH": env["PATH"]})
        assert again["PATH"] == env["PATH"]  # not prepended twice
    else:
        assert parts == ["/usr/bin", "/bin"]


def test_announce_line_names_version_pid_and_adapters() -> None:
    from metal_guard._version import __version__
    from metal_guard.install_report import AdapterStatus, InstallReport, announce_line
    from metal_guard.installer import DEGRADED, DISABLED, PATCHED, PENDING

    def report(first: AdapterStatus) -> InstallReport:
        return InstallReport(True, 1, "code", {}, [], "", {
            "mlx_lm": first,
            "mlx_vlm": AdapterStatus("mlx_vlm", PENDING, summary="vlm"),
            "langchain": AdapterStatus("langchain", DISABLED, summary="lc"),
        })

    line = announce_line("mlx_lm", report(AdapterStatus("mlx_lm", PATCHED, summary="load / generate")),
                         pid=4242)
    assert line.startswith(f"metal-guard {__version__} (pid 4242): guarding mlx_lm - load / generate")
    assert "also armed: mlx_vlm" in line and "langchain" not in line and "\n" not in line
    untested = AdapterStatus("mlx_lm", DEGRADED, "untested mlx-lm 0.40.0 (written for mlx-lm<0.33,>=0.32)",
                             "load / generate")
    line = announce_line("mlx_lm", report(untested), pid=1)
    assert "guarding mlx_lm (degraded: untested mlx-lm 0.40.0 (written for" in line
