"""A safety layer the isolation parent cannot import is an error (or a loud warning in observer
mode), never a silent skip: the breaker and gate before a spawn, the lock of a runner, the
breaker that counts a crash.

Each case runs in a fresh interpreter where the module really cannot be imported
(``sys.modules[name] = None`` makes ``import name`` raise ``ImportError``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

CHILD = textwrap.dedent('''
    import json, logging, os, sys
    broken, mode, action = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ["METALGUARD_MODE"] = mode
    sys.modules[broken] = None  # "import broken" now raises ImportError
    import psutil
    from metal_guard.breadcrumbs import tail
    from metal_guard.errors import GuardLayerError
    warnings = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logging.getLogger("metal_guard").addHandler(Collect())
    try:
        if action == "spawn-check":
            from metal_guard.isolation import supervisor
            supervisor.check_spawn_allowed("some/model")
        elif action == "runner":
            from metal_guard.isolation.runner import MLXSubprocessRunner
            MLXSubprocessRunner("some/model", use_lock=False, load_timeout=5).shutdown()
        elif action == "runner-lock":
            from metal_guard.isolation.runner import MLXSubprocessRunner
            MLXSubprocessRunner("some/model", use_lock=True, start=False).shutdown()
        elif action == "record-crash":
            from metal_guard.isolation import supervisor
            supervisor.record_crash(RuntimeError("worker died"), pid=12345)
        out = "proceeded"
    except GuardLayerError as exc:
        out = {"layer": exc.layer, "reason": exc.reason}
    children = [p.pid for p in psutil.Process().children(recursive=True)]
    crumbs = [c for c in tail(50) if "GUARD_BROKEN" in str(c)]
    print(json.dumps({"out": out, "warnings": warnings, "children": children,
                      "crumbs": len(crumbs)}))
''')


def run_child(broken: str, mode: str, action: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", CHILD, broken, mode, action],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("layer", ["metal_guard.breaker", "metal_guard.forensics.gate"])
def test_spawn_check_refuses_when_a_layer_cannot_be_imported(layer: str) -> None:
    res = run_child(layer, "defensive", "spawn-check")
    assert res["out"]["layer"] == layer
    assert "ImportError" in res["out"]["reason"] or "ModuleNotFoundError" in res["out"]["reason"]
    assert res["crumbs"] >= 1


@pytest.mark.parametrize("layer", ["metal_guard.breaker", "metal_guard.forensics.gate"])
def test_spawn_check_warns_in_observer_mode(layer: str) -> None:
    res = run_child(layer, "observer", "spawn-check")
    assert res["out"] == "proceeded"
    assert any(layer in w and "cannot be imported" in w for w in res["warnings"]), res
    assert res["crumbs"] >= 1


def test_a_runner_starts_no_worker_without_its_gate() -> None:
    res = run_child("metal_guard.forensics.gate", "defensive", "runner")
    assert res["out"]["layer"] == "metal_guard.forensics.gate"
    assert res["children"] == []  # refused before any worker process existed


def test_a_runner_that_asks_for_the_lock_refuses_without_the_lock_layer() -> None:
    res = run_child("metal_guard.lock", "defensive", "runner-lock")
    assert res["out"]["layer"] == "metal_guard.lock"
    observed = run_child("metal_guard.lock", "observer", "runner-lock")
    assert observed["out"] == "proceeded"
    assert any("metal_guard.lock" in w for w in observed["warnings"]), observed


def test_an_uncountable_crash_is_a_warning_not_silence() -> None:
    res = run_child("metal_guard.breaker", "defensive", "record-crash")
    assert res["out"] == "proceeded"  # recording a crash never raises
    assert any("metal_guard.breaker" in w and "not counted" in w for w in res["warnings"]), res
    assert res["crumbs"] >= 1
