"""The exception hierarchy: the LoadRefused and WorkerFailure families, retry hints, and the
0.11 constructor forms (issue 16).

Refusals are produced by the real layers (cadence store, breaker, panic gate, registry, fit
check) against the isolated home, not built by hand, wherever a layer can produce them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import metal_guard as mg
from metal_guard import errors
from metal_guard.breaker import CircuitBreaker
from metal_guard.cadence import CadenceGuard, require_cadence_clear
from metal_guard.errors import (
    CadenceViolation,
    CrossModelCadenceViolation,
    KnownPanicModelError,
    LoadRefused,
    MetalGuardError,
    MLXCooldownActive,
    ModelDoesNotFitError,
    PanicCooldownActive,
    SubprocessCrashError,
    SubprocessTimeoutError,
    WorkerError,
    WorkerFailure,
)
from metal_guard.forensics.gate import evaluate_panic_cooldown, mark_panic_sentinel_cooldown
from metal_guard.knowledge.registry import enforce_known_panic_policy, models_by_tier
from metal_guard.memory import require_fit

LOAD_REFUSALS = [CadenceViolation, CrossModelCadenceViolation, MLXCooldownActive,
                 PanicCooldownActive, KnownPanicModelError, ModelDoesNotFitError]
WORKER_FAILURES = [SubprocessCrashError, SubprocessTimeoutError, WorkerError]


# --------------------------------------------------------------------------- the hierarchy


@pytest.mark.parametrize("cls", LOAD_REFUSALS)
def test_every_load_refusal_is_a_load_refused(cls: type[Exception]) -> None:
    assert issubclass(cls, LoadRefused) and issubclass(cls, MetalGuardError)
    assert not issubclass(cls, WorkerFailure)


@pytest.mark.parametrize("cls", WORKER_FAILURES)
def test_every_worker_failure_is_a_worker_failure(cls: type[Exception]) -> None:
    assert issubclass(cls, WorkerFailure) and issubclass(cls, MetalGuardError)
    assert not issubclass(cls, LoadRefused)


def test_the_gate_refusal_is_not_a_breaker_refusal() -> None:
    assert not issubclass(PanicCooldownActive, MLXCooldownActive)
    assert not issubclass(MLXCooldownActive, PanicCooldownActive)


@pytest.mark.parametrize(("cls", "builtin"), [
    (CadenceViolation, RuntimeError), (MLXCooldownActive, RuntimeError),
    (PanicCooldownActive, RuntimeError), (KnownPanicModelError, RuntimeError),
    (ModelDoesNotFitError, MemoryError), (SubprocessCrashError, RuntimeError),
    (SubprocessTimeoutError, TimeoutError), (WorkerError, RuntimeError),
])
def test_each_keeps_the_builtin_a_0_11_caller_catches(cls: type[Exception], builtin: type) -> None:
    assert issubclass(cls, builtin)


def test_a_fit_refusal_is_not_a_runtime_error() -> None:
    """``except RuntimeError`` around an MLX call must not start swallowing fit refusals."""
    assert not issubclass(ModelDoesNotFitError, RuntimeError)


def test_the_families_are_public() -> None:
    for name in ("LoadRefused", "WorkerFailure", "GuardLayerError"):
        assert name in mg.__all__ and name in errors.__all__
        assert getattr(mg, name) is getattr(errors, name)


# --------------------------------------------------------------------------- retry_after_sec


def test_cadence_refusal_says_when_to_retry() -> None:
    require_cadence_clear("org/model-a", min_interval_sec=120)
    with pytest.raises(CadenceViolation) as info:
        require_cadence_clear("org/model-a", min_interval_sec=120)
    exc = info.value
    assert exc.retry_after_sec is not None and 100 < exc.retry_after_sec <= 120
    assert exc.retry_after_sec == exc.remaining_sec


def test_cross_model_cadence_refusal_says_when_to_retry() -> None:
    guard = CadenceGuard(min_interval_sec=0, cross_model_interval_sec=90)
    guard.require_clear("org/model-a")
    with pytest.raises(CrossModelCadenceViolation) as info:
        guard.require_clear("org/model-b")
    assert info.value.retry_after_sec is not None and 60 < info.value.retry_after_sec <= 90


def test_breaker_refusal_says_when_to_retry() -> None:
    breaker = CircuitBreaker(cooldown_sec=600)
    breaker.record_failure("worker_crash", "SIGABRT")
    breaker.record_failure("worker_crash", "SIGABRT")
    with pytest.raises(MLXCooldownActive) as info:
        breaker.check()
    assert info.value.retry_after_sec is not None and 500 < info.value.retry_after_sec <= 600


def test_gate_refusal_says_when_to_retry() -> None:
    mark_panic_sentinel_cooldown(1.0, reason="test")
    verdict = evaluate_panic_cooldown()
    exc = PanicCooldownActive(verdict)
    assert exc.verdict is verdict
    assert exc.retry_after_sec is not None and 3000 < exc.retry_after_sec <= 3600
    assert exc.cooldown_until == verdict.cooldown_until and exc.remaining_sec == exc.retry_after_sec
    assert str(exc).startswith("panic gate: ")


def test_a_gate_verdict_without_a_cooldown_has_no_retry_hint() -> None:
    exc = PanicCooldownActive(evaluate_panic_cooldown())  # nothing recorded: proceed
    assert exc.retry_after_sec is None and exc.remaining_sec == 0.0


def test_known_panic_refusal_has_no_retry_hint() -> None:
    model = next(iter(models_by_tier("panic")))
    with pytest.raises(KnownPanicModelError) as info:
        enforce_known_panic_policy(model)
    assert info.value.retry_after_sec is None


def test_fit_refusal_has_no_retry_hint() -> None:
    with pytest.raises(ModelDoesNotFitError) as info:
        require_fit(model_size_gb=1e6, model_name="org/enormous", cleanup=lambda: None)
    assert info.value.retry_after_sec is None


def test_one_handler_catches_every_load_refusal() -> None:
    caught: list[str] = []
    mark_panic_sentinel_cooldown(1.0, reason="test")
    breaker = CircuitBreaker()
    breaker.record_failure("worker_crash", "SIGABRT")
    breaker.record_failure("worker_crash", "SIGABRT")
    require_cadence_clear("org/model-c")
    attempts = [
        lambda: require_cadence_clear("org/model-c"),
        breaker.check,
        lambda: (_ for _ in ()).throw(PanicCooldownActive(evaluate_panic_cooldown())),
        lambda: enforce_known_panic_policy(next(iter(models_by_tier("panic")))),
        lambda: require_fit(model_size_gb=1e6, model_name="org/enormous", cleanup=lambda: None),
    ]
    for attempt in attempts:
        try:
            attempt()
        except LoadRefused as exc:
            caught.append(type(exc).__name__)
    assert caught == ["CadenceViolation", "MLXCooldownActive", "PanicCooldownActive",
                      "KnownPanicModelError", "ModelDoesNotFitError"]


# --------------------------------------------------------------------------- worker failures


def test_worker_fields_are_declared_and_default_to_unknown() -> None:
    for exc in (SubprocessCrashError("m", -9), SubprocessTimeoutError("m", 1.0),
                WorkerError("boom", exc_type="ValueError")):
        assert exc.worker_pid is None and exc.log_path is None
    assert SubprocessCrashError("m", -9).phase is None
    assert SubprocessTimeoutError("m", 1.0).phase == "generate"  # the 0.11 default
    assert WorkerError("boom").error_class is None and SubprocessTimeoutError("m", 1.0).detail == ""


def test_worker_fields_can_be_given() -> None:
    exc = SubprocessCrashError("m", -6, "abort", phase="load", worker_pid=4242, log_path="/tmp/w.log")
    assert (exc.phase, exc.worker_pid, exc.log_path) == ("load", 4242, "/tmp/w.log")
    assert exc.signal == "SIGABRT"
    t = SubprocessTimeoutError("m", 2.5, "prefill", worker_pid=7, log_path="/tmp/t.log")
    assert (t.phase, t.worker_pid, t.log_path, t.timeout) == ("prefill", 7, "/tmp/t.log", 2.5)
    w = WorkerError("boom", exc_type="ValueError", worker_traceback="tb", phase="generate", worker_pid=9)
    assert (w.phase, w.worker_pid, w.exc_type, w.worker_traceback) == ("generate", 9, "ValueError", "tb")


def test_a_real_worker_failure_is_caught_as_worker_failure(tmp_path: Path) -> None:
    pytest.importorskip("mlx_lm")
    from metal_guard.isolation import MLXSubprocessRunner

    missing = tmp_path / "no-such-model"
    missing.mkdir()  # a directory without weights: the worker's load raises
    with pytest.raises(WorkerFailure) as info:
        runner = MLXSubprocessRunner(missing)
        try:
            runner.generate("hi", max_tokens=1)
        finally:
            runner.shutdown()
    assert isinstance(info.value, WorkerError) and info.value.phase == "load"


# --------------------------------------------------------------------------- 0.11 constructor forms


def test_0_11_constructor_forms_still_work() -> None:
    cv = CadenceViolation("m", last_ts=1.0, min_interval=180.0, delta=30.0)
    assert cv.remaining_sec == 150.0 and cv.retry_after_sec == 150.0
    cross = CrossModelCadenceViolation("b", "a", 1.0, 90.0)
    assert cross.last_model == "a" and cross.retry_after_sec is None  # last_ts long ago: no wait left
    cool = MLXCooldownActive(remaining_sec=5.0, panic_count=2)
    assert cool.retry_after_sec == 5.0 and cool.panic_count == 2
    crash = SubprocessCrashError("m", -11, "Segmentation fault")
    assert crash.signal == "SIGSEGV" and crash.error_class is not None
    assert SubprocessTimeoutError("m", 3.0, "load").phase == "load"
    fit = ModelDoesNotFitError("no", model_name="m", required_bytes=2, available_bytes=1)
    assert fit.required_bytes == 2 and fit.retry_after_sec is None
