from __future__ import annotations

import json
import subprocess
import sys

from metal_guard.cli import EXIT_CODES, EXIT_USAGE, main


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metal_guard", *args], capture_output=True, text=True, timeout=120
    )


def test_exit_codes_are_unique_and_usage_is_64() -> None:
    assert EXIT_USAGE == 64
    assert len(set(EXIT_CODES)) == len(EXIT_CODES)


def test_version() -> None:
    proc = _run("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("metal-guard ")


def test_usage_error_is_64() -> None:
    proc = _run("--no-such-flag")
    assert proc.returncode == 64
    assert main(["doctor", "--bogus"]) == 64


def test_doctor_json_after_subcommand() -> None:
    proc = _run("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["backend"] == "cpu"
    assert report["versions"]["mlx"]
    assert report["paths"]["state_dir"].endswith("state")


def test_doctor_does_not_import_mlx() -> None:
    code = "import sys; from metal_guard.cli import main; main(['doctor']); print('mlx.core' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_bad_setting_is_usage_error(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("METALGUARD_PANIC_LOCKOUT_24H_N", "lots")
    proc = _run("doctor")
    assert proc.returncode == 64
    assert "METALGUARD_PANIC_LOCKOUT_24H_N" in proc.stderr


def test_command_table_matches_what_modules_register() -> None:
    import argparse

    from metal_guard.cli import _COMMAND_MODULES, _COMMANDS, build_parser

    for module in set(_COMMAND_MODULES):
        parser = build_parser([module])
        names = {
            name
            for action in parser._actions
            if isinstance(action, argparse._SubParsersAction)
            for name in action.choices
        }
        assert names == {c for c, m in _COMMANDS.items() if m == module}, module
    assert set(_COMMANDS.values()) == set(_COMMAND_MODULES)


def test_panic_gate_imports_only_its_own_command_module() -> None:
    code = (
        "import sys; from metal_guard.cli import main; rc = main(['panic-gate']); "
        "print(rc, sorted(m for m in sys.modules if m.startswith('metal_guard.cli.')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("0 ") and "metal_guard.cli.doctor" not in last and "metal_guard.cli.knowledge" not in last
