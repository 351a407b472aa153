"""The mlx_lm adapter on the real library and the tiny local model (CPU MLX)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

mlx_lm = pytest.importorskip("mlx_lm")

from metal_guard import installer as mg  # noqa: E402
from metal_guard.breadcrumbs import tail  # noqa: E402
from metal_guard.errors import (  # noqa: E402
    CadenceViolation,
    KnownPanicModelError,
    MetalOOMError,
    ModelDoesNotFitError,
)
from metal_guard.guards import suppressed as mg_suppressed  # noqa: E402
from metal_guard.resources import global_resource_tracker  # noqa: E402

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def raw(tiny_model_path: Path) -> dict[str, Any]:
    """Unguarded reference outputs (metal-guard not installed)."""
    assert not mg.is_installed()
    model, tok = mlx_lm.load(str(tiny_model_path))
    text = mlx_lm.generate(model, tok, prompt=PROMPT, max_tokens=12)
    stream = [r.text for r in mlx_lm.stream_generate(model, tok, prompt=PROMPT, max_tokens=12)]
    return {"text": text, "stream": stream}


@pytest.fixture
def guarded(tiny_model_path: Path) -> Iterator[dict[str, Any]]:
    report = mg.install(adapters=["mlx_lm"], cadence=False)
    try:
        yield report
    finally:
        mg.uninstall()


def test_guarded_load_generate_stream_match_unguarded(raw: dict[str, Any], guarded: dict[str, Any],
                                                      tiny_model_path: Path) -> None:
    assert mg.adapter_report()["adapters"]["mlx_lm"]["state"] == "patched"
    model, tok = mlx_lm.load(str(tiny_model_path))
    assert mlx_lm.generate(model, tok, prompt=PROMPT, max_tokens=12) == raw["text"]
    stream = [r.text for r in mlx_lm.stream_generate(model, tok, prompt=PROMPT, max_tokens=12)]
    assert stream == raw["stream"]
    # the package-level and module-level names agree and are guarded
    from metal_guard.adapters.base import count_guards

    assert count_guards(mlx_lm.generate) == 1 and count_guards(mlx_lm.load) == 1


def test_nested_generate_is_counted_once(guarded: dict[str, Any], tiny_model_path: Path) -> None:
    model, tok = mlx_lm.load(str(tiny_model_path))
    tracker = global_resource_tracker()
    before = tracker.count
    mlx_lm.generate(model, tok, prompt=PROMPT, max_tokens=4)  # generate -> stream_generate
    assert tracker.count == before + 1
    for _ in mlx_lm.stream_generate(model, tok, prompt=PROMPT, max_tokens=4):
        pass
    assert tracker.count == before + 2


def test_batch_generate_counts_each_prompt(guarded: dict[str, Any], tiny_model_path: Path) -> None:
    model, tok = mlx_lm.load(str(tiny_model_path))
    prompts = [tok.encode(p) for p in ("one two", "three four five", "six")]
    tracker = global_resource_tracker()
    before = tracker.count
    out = mlx_lm.batch_generate(model, tok, prompts, max_tokens=3)
    assert len(out.texts) == 3
    assert tracker.count == before + 3  # batch_generate once; inner insert/next are nested


def test_stream_close_and_return_through_the_guard(guarded: dict[str, Any], tiny_model_path: Path) -> None:
    model, tok = mlx_lm.load(str(tiny_model_path))
    gen = mlx_lm.stream_generate(model, tok, prompt=PROMPT, max_tokens=20)
    first = next(gen)
    assert isinstance(first.text, str)
    gen.close()
    with pytest.raises(StopIteration):
        next(gen)


def test_load_records_breadcrumbs_ledger_and_heartbeat(guarded: dict[str, Any], tiny_model_path: Path) -> None:
    from metal_guard.memory import ledger_entries
    from metal_guard.status import read_published_memory

    model, tok = mlx_lm.load(str(tiny_model_path))
    mlx_lm.generate(model, tok, prompt=PROMPT, max_tokens=3)
    crumbs = [(b.tag, b.payload, b.meta.get("model")) for b in tail(20)]
    assert ("LOAD", "START", str(tiny_model_path)) in crumbs
    assert ("LOAD", "DONE", str(tiny_model_path)) in crumbs
    entries = ledger_entries()
    assert any(e["model"] == str(tiny_model_path.resolve()) and e["peak_bytes"] > 0 for e in entries)
    beats = read_published_memory()
    assert beats and beats[0]["label"] == str(tiny_model_path)


def test_cadence_refuses_a_quick_reload(tiny_model_path: Path) -> None:
    # tiny models never wait under the risk-scaled rule; an explicit interval always applies
    mg.install(adapters=["mlx_lm"], cadence=True, cadence_min_interval_sec=180)
    try:
        mlx_lm.load(str(tiny_model_path))
        with pytest.raises(CadenceViolation):
            mlx_lm.load(str(tiny_model_path))
    finally:
        mg.uninstall()


def test_observer_mode_lets_a_cadence_violation_through(tiny_model_path: Path) -> None:
    mg.install(adapters=["mlx_lm"], cadence=True, mode="observer", cadence_min_interval_sec=180)
    try:
        mlx_lm.load(str(tiny_model_path))
        model, _ = mlx_lm.load(str(tiny_model_path))
        assert model is not None
    finally:
        mg.uninstall()
    observed = [b for b in tail(30) if b.tag == "OBSERVE"]
    assert any("cadence would refuse" in b.payload for b in observed)


def test_known_panic_model_is_refused_before_loading(guarded: dict[str, Any]) -> None:
    from metal_guard.knowledge.registry import models_by_tier

    panic_model = models_by_tier("panic")[0]
    with pytest.raises(KnownPanicModelError):
        mlx_lm.load(panic_model)


def test_model_that_cannot_fit_is_refused_before_loading(guarded: dict[str, Any]) -> None:
    with pytest.raises(ModelDoesNotFitError):
        mlx_lm.load("mlx-community/Llama-3-900B-Instruct-4bit")  # ~450 GB: refused by size


def test_fit_check_off_reaches_the_loader(tiny_model_path: Path) -> None:
    mg.install(adapters=["mlx_lm"], cadence=False, fit_check=False)
    try:
        with pytest.raises(FileNotFoundError) as info:  # offline: the hub lookup itself fails
            mlx_lm.load("mlx-community/Llama-3-900B-Instruct-4bit")
        assert not isinstance(info.value, ModelDoesNotFitError)
    finally:
        mg.uninstall()


def test_oom_during_generation_becomes_metal_oom_error(guarded: dict[str, Any], tiny_model_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An MLX OOM raised inside generate_step (what mlx >= 0.32 raises on Metal) surfaces as
    MetalOOMError from the guarded stream, with a recovery breadcrumb."""
    model, tok = mlx_lm.load(str(tiny_model_path))
    module = __import__("sys").modules["mlx_lm.generate"]
    real_step = module.generate_step

    def failing_step(*args: Any, **kwargs: Any) -> Any:
        steps = real_step(*args, **kwargs)
        try:
            yield next(steps)
            raise RuntimeError("[METAL] Command buffer execution failed: Insufficient Memory "
                               "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory).")
        finally:
            steps.close()  # finish the real generator on this thread (MLX streams are thread-affine)

    monkeypatch.setattr(module, "generate_step", failing_step)
    with pytest.raises(MetalOOMError) as info:
        for _ in mlx_lm.stream_generate(model, tok, prompt=PROMPT, max_tokens=10):
            pass
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, MemoryError)
    assert "Insufficient Memory" in str(info.value.__cause__)
    assert any(b.tag == "OOM_RECOVERY" for b in tail(10))


def test_isolated_model_block_routes_runner_calls_to_the_worker(guarded: dict[str, Any],
                                                                tiny_model_path: Path) -> None:
    """Inside ``with isolated_model(...) as m``, mlx_lm calls given ``m`` run in the worker and
    give what mlx_lm gives in-process (greedy by default, the prompt as given, the real finish
    reason); calls with an in-process model still run here, guarded."""
    from metal_guard.adapters.mlx_lm import IsolatedResponse
    from metal_guard.isolation import context as isolation

    model, tok = mlx_lm.load(str(tiny_model_path))
    with mg_suppressed():
        expected = mlx_lm.generate(model, tok, prompt="hello", max_tokens=6)
        expected_last = list(mlx_lm.stream_generate(model, tok, "hello", 6))[-1]
    tracker = global_resource_tracker()
    with isolation.isolated_model(str(tiny_model_path)) as runner:
        before = tracker.count
        text = mlx_lm.generate(runner, None, prompt="hello", max_tokens=6)
        chunks = list(mlx_lm.stream_generate(runner, None, "hello", 6))
        assert tracker.count == before  # nothing generated in this process
        local = mlx_lm.generate(model, tok, prompt="hello", max_tokens=3)
        assert tracker.count == before + 1
    assert text == expected and isinstance(local, str)
    assert chunks and all(isinstance(c, IsolatedResponse) for c in chunks)
    assert "".join(c.text for c in chunks) == text
    # the worker's own finish reason, the same as in-process mlx_lm's for this call
    assert expected_last.finish_reason in ("length", "stop")
    assert chunks[-1].finish_reason == expected_last.finish_reason
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_isolated_routing_carries_sampling_and_refuses_what_cannot_cross(
        guarded: dict[str, Any], tiny_model_path: Path) -> None:
    """Seeded temperature sampling in the worker equals the same sampling in-process; a sampler
    function or logits processors cannot cross and raise TypeError instead of being dropped."""
    import mlx.core as mx
    from mlx_lm.sample_utils import greedy_sampler, make_sampler

    from metal_guard.isolation import context as isolation

    model, tok = mlx_lm.load(str(tiny_model_path))
    with mg_suppressed():
        mx.random.seed(3)
        hot = mlx_lm.generate(model, tok, prompt="hello", max_tokens=10,
                              sampler=make_sampler(temp=5.0, top_k=40))
        greedy = mlx_lm.generate(model, tok, prompt="hello", max_tokens=10)
    assert hot != greedy  # the comparison below can tell sampling from greedy
    with isolation.isolated_model(str(tiny_model_path)) as runner:
        routed = mlx_lm.generate(runner, None, prompt="hello", max_tokens=10, temp=5.0, top_k=40,
                                 seed=3)
        routed_greedy = mlx_lm.generate(runner, None, prompt="hello", max_tokens=10,
                                        sampler=greedy_sampler)
        with pytest.raises(TypeError, match="sampler cannot cross"):
            mlx_lm.generate(runner, None, prompt="hello", sampler=make_sampler(temp=0.7))
        with pytest.raises(TypeError, match="logits_processors"):
            list(mlx_lm.stream_generate(runner, None, "hello", 4,
                                        logits_processors=[lambda toks, logits: logits]))
        with pytest.raises(TypeError, match="frobnicate"):
            mlx_lm.generate(runner, None, prompt="hello", frobnicate=1)
        with pytest.raises(TypeError, match="as text"):
            mlx_lm.generate(runner, None, prompt=[1, 2, 3])
    assert routed == hot and routed_greedy == greedy


def test_routed_call_defaults_are_mlx_lms() -> None:
    """Unset arguments get mlx_lm's defaults (greedy, 256 tokens), not the runner's."""
    from metal_guard.adapters.mlx_lm import _routed

    prompt, options, verbose = _routed(("m", None, "hi"), {}, streaming=False)
    assert (prompt, verbose) == ("hi", False)
    assert options == {"max_tokens": 256, "temperature": 0.0, "apply_chat_template": False}
    _, options, _ = _routed(("m", None, "hi", 7), {"top_p": 0.9, "max_kv_size": 64},
                            streaming=True)
    assert options["max_tokens"] == 7 and options["top_p"] == 0.9
    assert options["extra"] == {"max_kv_size": 64}


# --------------------------------------------------------------------------- version range


def test_version_in_range_is_patched_and_reported() -> None:
    from metal_guard.adapters import mlx_lm as adapter
    from metal_guard.install_report import AdapterState, distribution_version

    report = mg.install(adapters=["mlx_lm"], cadence=False)
    try:
        row = mg.adapter_report().adapters["mlx_lm"]
        assert row.state is AdapterState.PATCHED and row.reason == "" and row.untested == []
        assert row.requires == list(adapter.INSTRUMENTS)
        assert row.versions == {"mlx-lm": distribution_version("mlx-lm")}
        assert report.as_dict()["adapters"]["mlx_lm"]["state"] == "patched"
    finally:
        mg.uninstall()


def test_untested_version_is_degraded_loudly_but_still_guards(
        monkeypatch: pytest.MonkeyPatch, tiny_model_path: Path) -> None:
    """An mlx-lm outside the adapter's declared range: every target is still wrapped (never
    worse than unguarded), the state says "degraded: untested mlx-lm X", one warning says so;
    strict=True refuses instead."""
    import warnings

    from metal_guard import install_report
    from metal_guard.adapters.base import count_guards
    from metal_guard.errors import AdapterError

    real = install_report.distribution_version
    monkeypatch.setattr(install_report, "distribution_version",
                        lambda dist: "0.40.0" if dist == "mlx-lm" else real(dist))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mg.install(adapters=["mlx_lm"], cadence=False)
    try:
        ours = [w for w in caught if "untested mlx-lm 0.40.0" in str(w.message)]
        assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
        row = mg.adapter_report().adapters["mlx_lm"]
        assert row.state == "degraded"
        assert row.reason.startswith("untested mlx-lm 0.40.0 (written for mlx-lm")
        from metal_guard.adapters.mlx_lm import TARGETS

        # every target the in-range adapter wraps is wrapped here too
        assert row.versions == {"mlx-lm": "0.40.0"} and len(row.sites) == len(TARGETS)
        assert count_guards(mlx_lm.generate) == 1 and count_guards(mlx_lm.load) == 1
        model, tok = mlx_lm.load(str(tiny_model_path))
        before = global_resource_tracker().count
        assert mlx_lm.generate(model, tok, prompt=PROMPT, max_tokens=3)
        assert global_resource_tracker().count == before + 1  # the guard ran
    finally:
        mg.uninstall()
    with pytest.raises(AdapterError, match=r"untested mlx-lm 0\.40\.0"):
        mg.install(adapters=["mlx_lm"], strict=True, cadence=False)
    assert not mg.is_installed() and count_guards(mlx_lm.generate) == 0


def test_check_requirements_reads_the_seam(monkeypatch: pytest.MonkeyPatch) -> None:
    from metal_guard import install_report

    versions = {"a-lib": "1.2.3", "b-lib": None, "c-lib": "not a version", "d-lib": "2.0.0rc1"}
    monkeypatch.setattr(install_report, "distribution_version", versions.get)
    found, untested = install_report.check_requirements(
        ["a-lib>=1.2,<1.3", "b-lib>=1", "c-lib>=1", "d-lib>=1,<2", "not a requirement !!"])
    assert found == {"a-lib": "1.2.3", "b-lib": None, "c-lib": "not a version",
                     "d-lib": "2.0.0rc1"}
    assert [u.split(" (")[0].split(":")[0] for u in untested] == [
        "untested b-lib", "untested c-lib not a version", "untested d-lib 2.0.0rc1",
        "invalid version range 'not a requirement !!'"]
