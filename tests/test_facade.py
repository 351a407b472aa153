from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import metal_guard


def _fresh(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def test_import_is_free() -> None:
    out = _fresh(
        "import sys, json; before=set(sys.modules); import metal_guard; "
        "new=sorted(set(sys.modules)-before); print(json.dumps(new))"
    )
    new = json.loads(out)
    assert not [m for m in new if m == "mlx" or m.startswith(("mlx.", "mlx_", "wrapt", "psutil", "filelock", "platformdirs"))], new
    assert [m for m in new if m.startswith("metal_guard")] == ["metal_guard", "metal_guard._version"]


def test_import_does_no_io_or_env_changes() -> None:
    out = _fresh(
        "import os, json; before=dict(os.environ); import metal_guard; "
        "print(json.dumps(dict(os.environ)==before))"
    )
    assert json.loads(out) is True


def test_every_public_name_resolves() -> None:
    for name in metal_guard.__all__:
        assert getattr(metal_guard, name) is not None, name


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError):
        metal_guard.no_such_thing  # noqa: B018


def test_version() -> None:
    from importlib.metadata import version

    assert metal_guard.__version__ == version("metal-guard")


# --------------------------------------------------------------------------- the curated surface

def _names(text: str) -> list[str]:
    return text.split()


#: Every module-level name the metal-guard 0.11.7 README documents (its "API" tables, quick
#: start and registry examples). Each must stay importable from ``metal_guard`` and in __all__.
SEED_README_NAMES = _names("""
    check_known_panic_model warn_if_known_panic_model evaluate_panic_cooldown metal_guard
    require_cadence_clear CircuitBreaker MetalGuard SubprocessCrashError SubprocessTimeoutError
    scan_recent_aborts scan_recent_panics CooldownVerdict apple_gpu_family ResourceTracker
    breadcrumb_with_meta KNOWN_PANIC_MODELS check_known_panic_model_for_gpu models_by_tier
    models_affecting_gpu_family check_version_advisories kv_cache_clear_on_pressure MetalOOMError
    MemoryStats bench_scoped_load current_mode is_defensive is_observer describe_mode
    MLXSubprocessRunner call_model_isolated shutdown_all_workers acquire_mlx_lock release_mlx_lock
    read_mlx_lock mlx_exclusive_lock MLXLockConflict CadenceGuard CadenceViolation
    parse_panic_reports ingest_panics_jsonl detect_panic_signature mark_panic_sentinel_cooldown
    ack_panic_lockout clear_panic_ack clear_panic_sentinel scan_orphan_subproc_pre OrphanPre
    run_postmortem get_status_snapshot write_status_snapshot STATUS_SNAPSHOT_SCHEMA_VERSION
    install_upstream_defensive_patches audit_wired_limit read_gpu_driver_version
    log_system_audit_at_startup ModelDims lookup_dims KNOWN_MODELS estimate_prefill_peak_alloc_gb
    require_prefill_fit recommend_chunk_size describe_prefill_plan KVGrowthTracker
    detect_process_mode ProcessMode apply_mode_defaults describe_process_mode
    format_panic_for_apple_feedback PanicRecord subprocess_inference_guard
""")
#: The README's ``metal_guard.<method>`` rows (methods of the singleton) and ``MetalGuard.<x>``.
SEED_SINGLETON_METHODS = _names("""
    register_thread wait_for_threads flush_gpu safe_cleanup guarded_cleanup oom_protected
    oom_protected_context is_metal_oom can_fit require_fit memory_stats is_pressure_high
    ensure_headroom log_memory start_periodic_flush start_watchdog start_kv_cache_monitor breadcrumb
""")
SEED_CLASS_METHODS = ["estimate_model_size_from_name", "detect_hardware", "recommended_config"]
#: This version's entry points (the design card): install, the guards, memory and fit checks.
ENTRY_POINTS = _names("""
    install uninstall is_installed adapter_report guarded_generate guard_policy suppressed
    isolated_model bench_scoped_load memory_stats check_fit can_fit require_fit Settings
    get_settings LoadRefused WorkerFailure MetalGuardError
""")


def test_every_seed_documented_name_is_public() -> None:
    missing = [n for n in SEED_README_NAMES if n not in metal_guard.__all__]
    assert not missing, missing
    for name in SEED_README_NAMES:
        assert getattr(metal_guard, name) is not None, name
    for name in SEED_SINGLETON_METHODS:
        assert callable(getattr(metal_guard.metal_guard, name)), name
    for name in SEED_CLASS_METHODS:
        assert callable(getattr(metal_guard.MetalGuard, name)), name


def test_entry_points_are_public() -> None:
    assert not [n for n in ENTRY_POINTS if n not in metal_guard.__all__]


def test_all_is_the_curated_exports_sorted() -> None:
    curated = [n for n in metal_guard._EXPORTS if n not in metal_guard._COMPAT]
    assert metal_guard.__all__ == ["__version__", *sorted(curated)]
    assert len(set(metal_guard.__all__)) == len(metal_guard.__all__)


def test_compat_names_resolve_but_are_not_advertised() -> None:
    out = _fresh(
        "import json, metal_guard as mg\n"
        "names = sorted(mg._COMPAT)\n"
        "listed = [n for n in names if n in dir(mg) or n in mg.__all__]\n"
        "resolved = {n: type(getattr(mg, n)).__name__ for n in names}\n"
        "ns = {}\n"
        "exec('from metal_guard import *', ns)\n"
        "print(json.dumps({'listed': listed, 'resolved': resolved,\n"
        "                  'star': sorted(k for k in ns if not k.startswith('__'))}))\n"
    )
    data = json.loads(out)
    assert data["listed"] == []
    assert set(data["resolved"]) == set(metal_guard._COMPAT) and "kv_tracker" in data["resolved"]
    assert data["star"] == sorted(n for n in metal_guard.__all__ if n != "__version__")


def test_names_left_out_of_the_facade_live_in_their_module() -> None:
    import importlib

    for name, module in [("classify_crash", "metal_guard.classify"),
                         ("publish_memory", "metal_guard.status"),
                         ("run_demo", "metal_guard.demo"),
                         ("system_memory", "metal_guard.hardware"),
                         ("is_gemma4_family", "metal_guard.knowledge.families")]:
        assert callable(getattr(importlib.import_module(module), name))
        with pytest.raises(AttributeError):
            getattr(metal_guard, name)


def _type_checking_imports() -> dict[str, str]:
    """name -> module of the imports under ``if TYPE_CHECKING:`` in metal_guard/__init__.py."""
    import ast

    tree = ast.parse(Path(metal_guard.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    found: dict[str, str] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.module, ast.unparse(node)
        for alias in node.names:
            assert alias.asname in (None, alias.name), ast.unparse(node)
            assert alias.name not in found, f"{alias.name} imported twice"
            found[alias.name] = node.module
    return found


def test_type_checking_imports_mirror_the_lazy_exports() -> None:
    assert _type_checking_imports() == metal_guard._EXPORTS


def test_getattr_is_hidden_from_type_checkers() -> None:
    """A module ``__getattr__`` visible to mypy would make every misspelt name ``Any``."""
    import ast

    tree = ast.parse(Path(metal_guard.__file__).read_text())
    top_level = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert "__getattr__" not in top_level
    assert callable(vars(metal_guard)["__getattr__"])


# --------------------------------------------------------------------------- typed package

TYPING = Path(__file__).resolve().parent / "typing"

MISUSE = '''
import metal_guard
from metal_guard import bench_scoped_load, check_fit, isolated_model, memory_stats

stats: str = memory_stats()
check_fit(model_name=3)
metal_guard.instal()
with isolated_model(42) as runner:
    runner.generate(1)
with bench_scoped_load(7):
    pass
old: int = metal_guard.kv_tracker
'''
MISUSE_ERRORS = [
    'misuse.py:4: error: Incompatible types in assignment (expression has type "MemoryStats"',
    'misuse.py:5: error: Argument "model_name" to "check_fit" has incompatible type "int"',
    'misuse.py:6: error: Module has no attribute "instal"',
    'misuse.py:7: error: Argument 1 to "isolated_model" has incompatible type "int"',
    'misuse.py:8: error: Argument 1 to "generate" of "MLXSubprocessRunner" has incompatible type "int"',
    'misuse.py:9: error: Argument 1 to "bench_scoped_load" has incompatible type "int"',
    'misuse.py:11: error: Module "metal_guard" does not explicitly export attribute "kv_tracker"',
]


def test_the_wheel_is_typed_and_mypy_strict_sees_real_signatures(
        wheel_venv: Any, tmp_path: Path) -> None:
    """``mypy --strict`` (tests/typing/mypy.ini) against the package installed from the wheel:
    the user snippet passes, and misuse of the public names is caught with their real types."""
    pytest.importorskip("mypy")
    assert (wheel_venv.site / "metal_guard" / "py.typed").is_file()
    (tmp_path / "user_snippet.py").write_text((TYPING / "user_snippet.py").read_text())
    (tmp_path / "misuse.py").write_text(MISUSE.lstrip("\n"))
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(TYPING / "mypy.ini"),
         "--python-executable", str(wheel_venv.python), "--cache-dir", str(tmp_path / "cache"),
         "--no-error-summary", "user_snippet.py", "misuse.py"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    lines = proc.stdout.splitlines()
    assert not [line for line in lines if line.startswith("user_snippet.py")], proc.stdout
    for expected in MISUSE_ERRORS:
        assert any(line.startswith(expected) for line in lines), (expected, proc.stdout)
    assert proc.returncode == 1, proc.stdout + proc.stderr
