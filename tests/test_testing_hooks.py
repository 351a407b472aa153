"""metal_guard.testing: test-only fault hooks, enabled by the pytest plugin in this process and
by METALGUARD_TESTING=1 in a subprocess (a fault variable alone does nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import metal_guard.pytest_plugin as plugin
from metal_guard import testing
from metal_guard.errors import WorkerError
from metal_guard.isolation import MLXSubprocessRunner
from metal_guard.settings import get_settings


@pytest.fixture
def plugin_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a process without the pytest plugin (a worker, a server, a user's program)."""
    monkeypatch.setattr(plugin, "TESTING_ENABLED", False)
    monkeypatch.delenv("METALGUARD_TESTING", raising=False)


def test_the_plugin_enables_the_hooks_in_the_test_process() -> None:
    assert plugin.TESTING_ENABLED is True
    assert testing.enabled(get_settings(env={})) is True


@pytest.mark.usefixtures("plugin_off")
def test_fault_variables_alone_do_nothing() -> None:
    alone = get_settings(env={"METALGUARD_WORKER_TEST_FAULTS": "1",
                              "METALGUARD_TEST_SERVER_OOM_EVERY": "3"})
    assert alone.worker_test_faults is True and alone.test_server_oom_every == 3  # parsed ...
    assert testing.enabled(alone) is False                                       # ... not honoured
    assert testing.worker_faults_enabled(alone) is False
    assert testing.server_oom_every(alone) == 0
    both = get_settings(env={"METALGUARD_WORKER_TEST_FAULTS": "1", "METALGUARD_TESTING": "1",
                             "METALGUARD_TEST_SERVER_OOM_EVERY": "3"})
    assert testing.worker_faults_enabled(both) is True
    assert testing.server_oom_every(both) == 3
    assert testing.worker_faults_enabled(get_settings(env={"METALGUARD_TESTING": "1"})) is False


@pytest.mark.usefixtures("plugin_off")
def test_in_process_hooks_refuse_outside_testing() -> None:
    with pytest.raises(testing.TestingDisabled, match="METALGUARD_TESTING"):
        testing.inject_worker_fault(None, "abort")  # type: ignore[arg-type]
    sampling = {testing.TOKEN_DELAY_KEY: 2.0, "top_k": 5}
    assert testing.token_delay(sampling) is None
    assert testing.TOKEN_DELAY_KEY in sampling  # left in: the request is refused as unknown


def test_token_delay_is_taken_when_testing() -> None:
    sampling = {testing.TOKEN_DELAY_KEY: 0.5, "top_k": 5}
    assert testing.token_delay(sampling) == 0.5 and sampling == {"top_k": 5}


def test_invalid_testing_value_is_refused() -> None:
    from metal_guard.errors import SettingsError

    with pytest.raises(SettingsError, match="METALGUARD_TESTING"):
        get_settings(env={"METALGUARD_TESTING": "maybe"})


PROBE = ("import json; from metal_guard.settings import get_settings; from metal_guard import testing; "
         "s = get_settings(); print(json.dumps([testing.enabled(s), testing.worker_faults_enabled(s), "
         "testing.server_oom_every(s)]))")


@pytest.mark.parametrize(("extra", "want"), [
    ({}, [False, False, 0]),
    ({"METALGUARD_TESTING": "1"}, [True, True, 2]),
])
def test_a_subprocess_needs_metalguard_testing(tmp_path: Path, extra: dict[str, str],
                                               want: list[object]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALGUARD_")}
    env.update(METALGUARD_HOME=str(tmp_path), METALGUARD_WORKER_TEST_FAULTS="1",
               METALGUARD_TEST_SERVER_OOM_EVERY="2", **extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert json.loads(out.stdout) == want


def test_a_worker_without_metalguard_testing_refuses_faults(module_home: Path,
                                                            tiny_model_path: Path) -> None:
    with MLXSubprocessRunner(tiny_model_path, env={"METALGUARD_WORKER_TEST_FAULTS": "1"}) as r:
        pid = r.worker_pid
        with pytest.raises(WorkerError, match="METALGUARD_TESTING"):
            testing.inject_worker_fault(r, "abort")
        assert r.worker_pid == pid  # not crashed: the fault was refused, the worker serves on
        assert r.generate("hello", max_tokens=2)
