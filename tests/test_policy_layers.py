"""A guard layer that cannot be imported is never a silent skip (issue 16).

The broken layers are real: in a child interpreter, a module of the package is made
unimportable (``sys.modules[name] = None``, or an import hook whose loader raises), and a real
``mlx_lm.load`` / ``mlx_lm.generate`` of the tiny model runs through the installed guards.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from metal_guard import _policy_steps
from metal_guard.errors import GuardLayerError, MetalGuardError

#: Every safety layer the load and generate policies import, and where it is used.
SAFETY_LAYERS = [
    "metal_guard.migrate",
    "metal_guard.forensics.gate",
    "metal_guard.breaker",
    "metal_guard.knowledge.registry",
    "metal_guard.memory",
    "metal_guard.cadence",
    "metal_guard.lock",
    "metal_guard.prefill",
]
HELPER_LAYERS = ["metal_guard.backend", "metal_guard.status", "metal_guard.resources"]

CHILD = textwrap.dedent('''
    import importlib.abc, importlib.machinery, json, logging, os, sys
    os.environ["METALGUARD_CADENCE_MIN_INTERVAL_SEC"] = "0"  # the same model, loaded again and again
    import mlx_lm
    import metal_guard
    from metal_guard import _policy_steps, policy
    from metal_guard.breadcrumbs import tail
    from metal_guard.errors import GuardLayerError

    path, safety, helpers = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    metal_guard.install(adapters=["mlx_lm"], use_lock=True)
    warnings = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logging.getLogger("metal_guard").addHandler(Collect())

    def run(mode):
        os.environ["METALGUARD_MODE"] = mode
        policy.refresh_settings()
        try:
            model, tok = mlx_lm.load(path)
            mlx_lm.generate(model, tok, [1, 2, 3, 4], max_tokens=2)  # token ids: the prefill guard runs
            return "ok"
        except GuardLayerError as exc:
            return {"layer": exc.layer, "reason": exc.reason, "message": str(exc)}

    class Exploding(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        """A module that is found but raises while it executes (a half-written file)."""
        def __init__(self, name):
            self.name = name
        def find_spec(self, fullname, target_path=None, target=None):
            if fullname != self.name:
                return None
            return importlib.machinery.ModuleSpec(fullname, self)
        def create_module(self, spec):
            return None
        def exec_module(self, module):
            raise RuntimeError("half-written module")

    def broken(name, how):
        saved = sys.modules.get(name)
        finder = None
        if how == "none":
            sys.modules[name] = None
        else:
            sys.modules.pop(name, None)
            finder = Exploding(name)
            sys.meta_path.insert(0, finder)
        _policy_steps._LAYERS.clear()
        return saved, finder

    def restore(name, saved, finder):
        if finder is not None:
            sys.meta_path.remove(finder)
        if saved is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved
        _policy_steps._LAYERS.clear()

    out = {"warm": run("defensive"), "safety": {}, "helpers": {}}
    cases = [(name, "none") for name in safety] + [("metal_guard.knowledge.registry", "raises")]
    for name, how in cases:
        saved, finder = broken(name, how)
        try:
            res = {"defensive": run("defensive")}
            before = len(warnings)
            res["observer"] = run("observer")
            res["observer_warnings"] = [w for w in warnings[before:] if name in w]
        finally:
            restore(name, saved, finder)
        res["after_restore"] = run("defensive")
        res["crumbs"] = [(b.payload, b.meta.get("mode")) for b in tail(400)
                         if b.tag == "GUARD_BROKEN" and b.payload == name]
        out["safety"][name + ":" + how] = res
    for name in helpers:
        saved, finder = broken(name, "none")
        try:
            before = len(warnings)
            first, second = run("defensive"), run("defensive")
            out["helpers"][name] = {"results": [first, second],
                                    "warnings": [w for w in warnings[before:] if name in w]}
        finally:
            restore(name, saved, finder)
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def outcome(tiny_model_path: Path, module_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("mlx_lm")
    root = tmp_path_factory.mktemp("layers")
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALGUARD_")}
    env.update(METALGUARD_HOME=str(module_home), HF_HUB_OFFLINE="1",
               METALGUARD_DIAGNOSTIC_REPORTS_DIRS=str(root / "reports"),
               METALGUARD_LEGACY_DIR=str(root / "legacy"))
    (root / "reports").mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tiny_model_path), json.dumps(SAFETY_LAYERS),
         json.dumps(HELPER_LAYERS)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_the_guarded_calls_work_when_nothing_is_broken(outcome: Any) -> None:
    assert outcome["warm"] == "ok"
    assert len(outcome["safety"]) == len(SAFETY_LAYERS) + 1


@pytest.mark.parametrize("layer", SAFETY_LAYERS)
def test_a_missing_safety_layer_refuses_in_defensive_mode(outcome: Any, layer: str) -> None:
    res = outcome["safety"][layer + ":none"]
    refused = res["defensive"]
    assert isinstance(refused, dict), f"{layer} missing, yet the guarded call went through: {res}"
    assert refused["layer"] == layer
    assert "ModuleNotFoundError" in refused["reason"] and "Reinstall metal-guard" in refused["message"]
    assert res["after_restore"] == "ok"  # the refusal came from the broken layer, nothing else


@pytest.mark.parametrize("layer", SAFETY_LAYERS)
def test_a_missing_safety_layer_warns_loudly_in_observer_mode(outcome: Any, layer: str) -> None:
    res = outcome["safety"][layer + ":none"]
    assert res["observer"] == "ok"
    assert res["observer_warnings"], f"observer mode let {layer} go without a warning"
    assert all("reinstall metal-guard" in w for w in res["observer_warnings"])
    modes = {mode for _, mode in res["crumbs"]}  # (memory is also a helper: a crumb without a mode)
    assert {"defensive", "observer"} <= modes, res["crumbs"]


def test_a_layer_that_raises_while_importing_is_broken_too(outcome: Any) -> None:
    res = outcome["safety"]["metal_guard.knowledge.registry:raises"]
    assert res["defensive"]["layer"] == "metal_guard.knowledge.registry"
    assert res["defensive"]["reason"] == "RuntimeError: half-written module"
    assert res["observer"] == "ok" and res["observer_warnings"]
    assert res["after_restore"] == "ok"


@pytest.mark.parametrize("layer", HELPER_LAYERS)
def test_a_missing_helper_is_skipped_with_one_warning(outcome: Any, layer: str) -> None:
    res = outcome["helpers"][layer]
    assert res["results"] == ["ok", "ok"]  # it refuses nothing: the call is not failed for it
    assert len(res["warnings"]) == 1 and "cannot be imported" in res["warnings"][0]


# --------------------------------------------------------------------------- a step's own imports


def test_a_step_that_cannot_import_a_module_of_the_package_is_a_broken_layer(
        caplog: pytest.LogCaptureFixture) -> None:
    def check() -> None:
        importlib.import_module("metal_guard.no_such_layer_for_this_test")

    with pytest.raises(GuardLayerError) as info:
        _policy_steps._step("panic gate", check, "defensive", "some/model")
    assert info.value.layer == "metal_guard.no_such_layer_for_this_test"
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    with caplog.at_level(logging.WARNING, logger="metal_guard.policy"):
        assert _policy_steps._step("panic gate", check, "observer", "some/model") is None
    assert any("metal_guard.no_such_layer_for_this_test" in r.getMessage() for r in caplog.records)


def test_a_step_missing_a_third_party_module_is_skipped_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    def check() -> None:
        importlib.import_module("no_such_third_party_module_for_this_test")

    with caplog.at_level(logging.WARNING, logger="metal_guard.policy"):
        assert _policy_steps._step("fit check", check, "defensive", "some/model") is None
    assert any("fit check failed" in r.getMessage() for r in caplog.records)


def test_guard_layer_error_is_a_metal_guard_runtime_error() -> None:
    exc = GuardLayerError("metal_guard.breaker", "ModuleNotFoundError: gone")
    assert isinstance(exc, MetalGuardError) and isinstance(exc, RuntimeError)
    assert "metal_guard.breaker" in str(exc) and "METALGUARD_MODE=observer" in str(exc)
