"""The guard policies (load / generate / step), their context and their building blocks.

Targets here are plain Python functions wrapped exactly as an adapter would wrap them, so each
policy step is exercised on its own; the real-library path is in test_adapter_mlx_lm.py.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from metal_guard import policy
from metal_guard.adapters.base import guard_wrapper, make_guard
from metal_guard.breadcrumbs import tail
from metal_guard.errors import (
    CadenceViolation,
    KnownPanicModelError,
    MetalOOMError,
    MLXCooldownActive,
    ModelDoesNotFitError,
    PanicCooldownActive,
)
from metal_guard.policy import CallInfo


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    policy.refresh_settings()
    yield
    policy.configure(None)


class FakeModel:
    """Stands in for an ``nn.Module`` (weak-referenceable, like MLX's)."""

    def __init__(self, name: str, args: Any = None) -> None:
        self.name = name
        self.args = args


def guarded_loader(model_id: str = "tiny-test-model") -> Any:
    calls: list[str] = []

    def load(path: str) -> tuple[Any, str]:
        calls.append(path)
        return FakeModel(path), "tokenizer"

    def describe(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallInfo:
        return CallInfo("test:load", model_id=args[0] if args else model_id)

    fn = make_guard(load, guard_wrapper("load", "call", site="test:load", describe=describe),
                    site="test:load", generation=None)
    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def guarded_generate_fn(body: Any = None) -> Any:
    def generate(model: Any, prompt: Any) -> str:
        return body(model, prompt) if body else "text"

    def describe(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallInfo:
        prompt = args[1]
        return CallInfo("test:generate", model=args[0],
                        prompt_tokens=len(prompt) if isinstance(prompt, list) else None)

    return make_guard(generate, guard_wrapper("generate", "call", site="test:generate", describe=describe),
                      site="test:generate", generation=None)


# --------------------------------------------------------------------------- context


def test_scope_merges_and_restores() -> None:
    with policy.scope(model_id="a", cadence=False) as outer:
        assert outer == {"model_id": "a", "cadence": False}
        with policy.scope(model_id="b"):
            assert dict(policy.current_policy()) == {"model_id": "b", "cadence": False}
        assert policy.current_policy()["model_id"] == "a"
    assert dict(policy.current_policy()) == {}


def test_scope_rejects_unknown_keys_and_bad_mode() -> None:
    with pytest.raises(TypeError, match="bogus"), policy.scope(bogus=1):
        pass
    with pytest.raises(ValueError), policy.scope(mode="nope"):
        pass


def test_settings_for_call_layers_install_scope_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_FLUSH_EVERY_N", "7")
    policy.configure({"cadence_min_interval_sec": 5.0})
    s = policy.settings_for_call()
    assert (s.flush_every_n, s.cadence_min_interval_sec) == (7, 5.0)
    with policy.scope(flush_every_n=3, model_id="x"):
        assert policy.settings_for_call().flush_every_n == 3
    assert policy.hot_settings().flush_every_n == 7


# --------------------------------------------------------------------------- load policy


def test_load_runs_and_remembers_the_model_id() -> None:
    load = guarded_loader()
    model, _ = load("models/tiny-a")
    assert load.calls == ["models/tiny-a"]
    assert policy.model_id_of(model) == "models/tiny-a"
    crumbs = [(b.tag, b.payload) for b in tail(5)]
    assert ("LOAD", "START") in crumbs and ("LOAD", "DONE") in crumbs


def test_load_cadence_defensive_refuses_observer_records() -> None:
    load = guarded_loader()
    load("models/tiny-b")
    with pytest.raises(CadenceViolation):
        load("models/tiny-b")
    assert load.calls == ["models/tiny-b"]  # refused before the loader ran
    with policy.scope(mode="observer"):
        load("models/tiny-b")
    assert load.calls == ["models/tiny-b", "models/tiny-b"]
    assert any(b.tag == "OBSERVE" and "cadence" in b.payload for b in tail(10))
    with policy.scope(cadence=False):
        load("models/tiny-b")
    assert len(load.calls) == 3


def test_load_cadence_interval_from_install_options() -> None:
    policy.configure({"cadence_min_interval_sec": 0.0})
    load = guarded_loader()
    load("models/tiny-c")
    load("models/tiny-c")
    assert len(load.calls) == 2


def test_load_refused_during_panic_gate_cooldown() -> None:
    from metal_guard.forensics.gate import mark_panic_sentinel_cooldown

    mark_panic_sentinel_cooldown(1.0, reason="test")
    load = guarded_loader()
    with pytest.raises(PanicCooldownActive):
        load("models/tiny-d")
    with policy.scope(gate=False, cadence=False):
        load("models/tiny-d")
    assert load.calls == ["models/tiny-d"]


def test_load_refused_while_breaker_is_open() -> None:
    from metal_guard.breaker import CircuitBreaker

    breaker = CircuitBreaker()
    breaker.record_failure("worker_crash", "SIGABRT")
    breaker.record_failure("worker_crash", "SIGABRT")
    load = guarded_loader()
    with pytest.raises(MLXCooldownActive):
        load("models/tiny-e")
    assert load.calls == []


def test_known_panic_model_refused_unless_allowed() -> None:
    from metal_guard.knowledge.registry import models_by_tier

    panic_model = models_by_tier("panic")[0]
    load = guarded_loader()
    with pytest.raises(KnownPanicModelError):
        load(panic_model)
    with policy.scope(allow_panic_models=True, fit_check=False):
        load(panic_model)
    assert load.calls == [panic_model]


def test_fit_check_refuses_by_size_and_can_be_switched_off() -> None:
    load = guarded_loader()
    with pytest.raises(ModelDoesNotFitError):
        load("acme/Llama-3-900B-4bit")
    with policy.scope(fit_check=False):
        load("acme/Llama-3-900B-4bit")
    assert load.calls == ["acme/Llama-3-900B-4bit"]


def test_a_broken_policy_step_never_blocks_the_load(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    import metal_guard.cadence as cadence

    def broken(*a: Any, **k: Any) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(cadence, "clear_for_load", broken)
    load = guarded_loader()
    with caplog.at_level(logging.WARNING, logger="metal_guard.policy"):
        load("models/tiny-f")
    assert load.calls == ["models/tiny-f"]
    assert "guard step cadence failed" in caplog.text


def test_use_lock_holds_the_cross_process_lock_during_the_load() -> None:
    from metal_guard.lock import read_mlx_lock

    seen: list[Any] = []

    def load(path: str) -> tuple[Any, str]:
        seen.append(read_mlx_lock())
        return SimpleNamespace(), "tok"

    fn = make_guard(load, guard_wrapper("load", "call", site="t:l",
                                        describe=lambda i, a, k: CallInfo("t:l", model_id=a[0])),
                    site="t:l", generation=None)
    with policy.scope(use_lock=True, cadence=False):
        fn("models/locked")
    assert seen[0] is not None and "models/locked" in str(seen[0].get("label"))
    assert read_mlx_lock() is None


# --------------------------------------------------------------------------- generate policy


def test_periodic_flush_every_n_calls(caplog: pytest.LogCaptureFixture) -> None:
    gen = guarded_generate_fn()
    with caplog.at_level(logging.DEBUG, logger="metal_guard.policy"), policy.scope(flush_every_n=2):
        for _ in range(6):
            gen(None, "p")
    assert caplog.text.count("periodic flush after") == 3


def test_prefill_guard_refuses_a_huge_prompt_in_defensive_mode() -> None:
    model = SimpleNamespace(args=SimpleNamespace(num_hidden_layers=80, num_attention_heads=64,
                                                 num_key_value_heads=8, hidden_size=8192))
    gen = guarded_generate_fn()
    with pytest.raises(MetalOOMError, match="prefill"):
        gen(model, list(range(200_000)))
    with policy.scope(mode="observer"):
        assert gen(model, list(range(200_000))) == "text"
    with policy.scope(prefill_guard=False):
        assert gen(model, list(range(200_000))) == "text"
    assert gen(model, list(range(1_000))) == "text"


def test_gemma4_first_generation_flush_runs_once_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    load = guarded_loader()
    with policy.scope(fit_check=False, registry=False):
        model, _ = load("mlx-community/gemma-4-e4b-it-4bit")
    gen = guarded_generate_fn()
    with policy.scope(gemma4_firstgen_sleep_sec=0.0):
        gen(model, "p")
        gen(model, "p")
    flushes = [b for b in tail(20) if b.tag == "GEMMA4_FLUSH"]
    assert len(flushes) == 1


def test_generation_heartbeat_is_throttled() -> None:
    from metal_guard.status import read_published_memory

    policy._last_publish = 0.0
    gen = guarded_generate_fn()
    import mlx.core  # noqa: F401  (counters need MLX loaded; the policy never imports it)

    gen(None, "p")
    first = read_published_memory()
    gen(None, "p")
    assert len(first) == 1
    assert read_published_memory()[0]["published_at_ts"] == first[0]["published_at_ts"]


# --------------------------------------------------------------------------- fork safety


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_after_metal_use_is_poisoned_and_install_lock_is_fresh(tmp_path: Path) -> None:
    """The child of a fork taken while another thread holds the install lock can still use it;
    guarded MLX work in a child forked after Metal was touched fails clearly (darwin rule,
    forced on here)."""
    code = textwrap.dedent("""
        import os, sys, threading, time
        from metal_guard import installer as mg, policy
        from metal_guard.guards import guarded_generate
        policy.FORK_POISON_PLATFORMS = (sys.platform,)
        mg.install(adapters=[])
        held, release = threading.Event(), threading.Event()
        def holder():
            with mg._lock:
                held.set(); release.wait(5)
        t = threading.Thread(target=holder); t.start(); held.wait()

        @guarded_generate
        def work():
            return "ok"
        work()  # touches "Metal"
        # fork waits for the install lock (before-fork handler), so release it from a timer
        threading.Timer(0.2, release.set).start()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                got = mg._lock.acquire(timeout=2); mg._lock.release()
                code |= 0 if got else 1
                try:
                    work(); code |= 2
                except Exception as exc:
                    code |= 0 if "fork" in str(exc) else 4
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        t.join()
        print("child", os.waitstatus_to_exitcode(status))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALGUARD_")}
    env["METALGUARD_HOME"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("child 0"), proc.stdout + proc.stderr
