"""MLXSubprocessRunner against real workers running real MLX on the tiny models.

One worker is shared by the module (its start costs ~1.5 s); tests that must replace it
say so. Outputs are compared with in-process ``mlx_lm`` / ``mlx_vlm`` on the same model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from metal_guard.errors import MetalOOMError, WorkerError
from metal_guard.isolation import MLXSubprocessRunner
from metal_guard.testing import inject_worker_fault, worker_fault_env

FAULTS = worker_fault_env()
OOM = ("[METAL] Command buffer execution failed: Insufficient Memory "
       "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)")


@pytest.fixture(scope="module")
def runner(module_home: Path, tiny_model_path: Path) -> Iterator[MLXSubprocessRunner]:
    r = MLXSubprocessRunner(tiny_model_path, env=FAULTS)
    yield r
    r.shutdown()


@pytest.fixture(scope="module")
def in_process(tiny_model_path: Path) -> Any:
    """The same model loaded in the test process, and a generate() with the same knobs."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    model, tok = mlx_lm.load(str(tiny_model_path))

    def generate(prompt: str, *, system: str | None = None, template: bool = True,
                 max_tokens: int = 40, temp: float = 0.0, seed: int | None = None,
                 repetition_penalty: float | None = None, **sampler: Any) -> str:
        if template:
            msgs = ([{"role": "system", "content": system}] if system else [])
            msgs.append({"role": "user", "content": prompt})
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        else:
            text = f"{system}\n\n{prompt}" if system else prompt
        if seed is not None:
            mx.random.seed(seed)
        procs = make_logits_processors(repetition_penalty=repetition_penalty) \
            if repetition_penalty else None
        return mlx_lm.generate(model, tok, prompt=text, max_tokens=max_tokens,
                               sampler=make_sampler(temp=temp, **sampler),
                               logits_processors=procs)

    return generate


# ----------------------------------------------------------------------------- equivalence


def test_greedy_output_equals_in_process_generate(runner: MLXSubprocessRunner,
                                                   in_process: Any) -> None:
    got = runner.generate("tell me about the cat", max_tokens=40, temperature=0.0, seed=0)
    assert got == in_process("tell me about the cat", max_tokens=40, seed=0)
    assert len(got) > 0
    info = runner.last_result
    assert info is not None and info["generation_tokens"] == 40 and info["finish_reason"] == "length"


def test_defaults_are_mlx_lms_defaults(runner: MLXSubprocessRunner, in_process: Any) -> None:
    """No sampling arguments: greedy and mlx_lm's max_tokens, so the text equals mlx_lm's."""
    import inspect

    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    lib_max = inspect.signature(generate_step).parameters["max_tokens"].default
    lib_temp = inspect.signature(make_sampler).parameters["temp"].default
    assert (lib_max, lib_temp) == (256, 0.0)
    for fn in (MLXSubprocessRunner.generate, MLXSubprocessRunner.stream_generate):
        params = inspect.signature(fn).parameters
        assert params["max_tokens"].default == lib_max
        assert params["temperature"].default == lib_temp
    got = runner.generate("tell me about the cat")
    assert got == in_process("tell me about the cat", max_tokens=lib_max, temp=lib_temp)
    info = runner.last_result
    assert info is not None and info["generation_tokens"] == lib_max
    assert info["finish_reason"] == "length"


def test_every_sampling_argument_reaches_the_sampler(runner: MLXSubprocessRunner,
                                                     in_process: Any) -> None:
    kw: dict[str, Any] = dict(max_tokens=30, seed=1234)
    got = runner.generate("the quick brown fox", temperature=1.2, top_p=0.8, top_k=12,
                          min_p=0.02, **kw)
    want = in_process("the quick brown fox", temp=1.2, top_p=0.8, top_k=12, min_p=0.02, **kw)
    assert got == want
    # and they matter: greedy decoding of the same prompt is different
    assert got != runner.generate("the quick brown fox", temperature=0.0, **kw)
    other_seed = runner.generate("the quick brown fox", temperature=1.2, top_p=0.8, top_k=12,
                                 min_p=0.02, max_tokens=30, seed=99)
    assert other_seed == in_process("the quick brown fox", temp=1.2, top_p=0.8, top_k=12,
                                    min_p=0.02, max_tokens=30, seed=99)
    assert other_seed != got


def test_repetition_penalty_is_honoured(runner: MLXSubprocessRunner, in_process: Any) -> None:
    got = runner.generate("hello", temperature=0.0, repetition_penalty=1.8, max_tokens=30)
    assert got == in_process("hello", repetition_penalty=1.8, max_tokens=30)
    assert got != runner.generate("hello", temperature=0.0, max_tokens=30)


def test_system_prompt_and_chat_template(runner: MLXSubprocessRunner, in_process: Any) -> None:
    assert runner.ready_info and runner.ready_info["has_chat_template"] is True
    got = runner.generate("what now", system="you are a pirate", temperature=0.0,
                          max_tokens=30)
    assert got == in_process("what now", system="you are a pirate", max_tokens=30)
    raw = runner.generate("what now", temperature=0.0, max_tokens=30, apply_chat_template=False)
    assert raw == in_process("what now", template=False, max_tokens=30)
    messages = [{"role": "system", "content": "you are a pirate"},
                {"role": "user", "content": "what now"}]
    assert runner.generate(messages, temperature=0.0, max_tokens=30) == got


def test_stream_yields_chunks_that_add_up_to_generate(runner: MLXSubprocessRunner) -> None:
    chunks = list(runner.stream_generate("a story", temperature=0.0, max_tokens=40))
    assert len(chunks) > 3 and all(isinstance(c, str) and c for c in chunks)
    assert "".join(chunks) == runner.generate("a story", temperature=0.0, max_tokens=40)


def test_closing_a_stream_early_keeps_the_worker(runner: MLXSubprocessRunner) -> None:
    pid = runner.worker_pid
    stream = runner.stream_generate("go on", temperature=0.0, max_tokens=1_000_000)
    first = [next(stream) for _ in range(3)]
    assert len(first) == 3
    stream.close()  # the worker stops generating; it is not killed
    assert runner.worker_pid == pid
    assert runner.generate("hi", temperature=0.0, max_tokens=5)
    assert runner.worker_pid == pid and runner.crash_count == 0


def test_a_second_request_from_inside_an_open_stream_is_refused(
        runner: MLXSubprocessRunner) -> None:
    stream = runner.stream_generate("go on", max_tokens=1000)
    next(stream)
    with pytest.raises(RuntimeError, match="still open in this thread"):
        runner.generate("nested")
    stream.close()


def test_bad_arguments_fail_before_touching_the_worker(runner: MLXSubprocessRunner) -> None:
    pid = runner.worker_pid
    with pytest.raises(ValueError, match="max_tokens"):
        runner.generate("x", max_tokens=0)
    with pytest.raises(TypeError, match="unknown generation argument"):
        runner.generate("x", temprature=0.2)
    with pytest.raises(ValueError, match="mlx-vlm"):
        runner.generate("x", image="cat.png")
    with pytest.raises(ValueError, match="timeout"):
        runner.generate("x", timeout=0)
    assert runner.worker_pid == pid


# ----------------------------------------------------------------------------- worker facts


def test_worker_process_facts(runner: MLXSubprocessRunner, module_home: Path) -> None:
    info = runner.ready_info
    assert info is not None and info["pid"] == runner.worker_pid and info["device"] == "cpu"
    proc = psutil.Process(runner.worker_pid)
    assert abs(proc.create_time() - info["create_time"]) < 0.05
    assert proc.ppid() == os.getpid()
    assert os.getpgid(proc.pid) == proc.pid != os.getpgrp()  # its own process group
    env = proc.environ()
    assert env["METALGUARD_SUBPROCESS_WORKER"] == "1" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert "metal_guard.isolation.worker" in " ".join(proc.cmdline())
    logs = list((module_home / "cache" / "workers").glob("*.log"))
    assert [p for p in logs if str(os.getpid()) in p.name]


def test_stats_report_worker_counters_and_footprint(runner: MLXSubprocessRunner) -> None:
    runner.generate("hi", max_tokens=5)
    stats = runner.stats()
    assert stats["pid"] == runner.worker_pid and stats["alive"] is True
    assert stats["footprint_bytes"] > 10 << 20
    assert stats["worker"]["peak_bytes"] > 0 and stats["worker"]["generate_count"] >= 1
    assert stats["max_footprint_bytes"] and stats["max_footprint_bytes"] > stats["footprint_bytes"]


# ----------------------------------------------------------------------------- worker errors


def test_oom_inside_the_worker_is_a_metal_oom_error(runner: MLXSubprocessRunner) -> None:
    pid = runner.worker_pid
    with pytest.raises(MetalOOMError) as info:
        inject_worker_fault(runner, "raise", message=OOM)
    err = info.value
    assert isinstance(err, MemoryError) and isinstance(err, RuntimeError)
    assert err.error_class is not None and err.error_class.name == "cmd_buffer_oom"
    assert "faults.py" in err.worker_traceback  # type: ignore[attr-defined]
    assert runner.worker_pid == pid  # a catchable OOM does not cost the worker
    assert runner.generate("hi", max_tokens=3, temperature=0.0)


def test_other_worker_exceptions_are_worker_errors(runner: MLXSubprocessRunner) -> None:
    pid = runner.worker_pid
    with pytest.raises(WorkerError) as info:
        runner.generate("x", max_tokens=3, extra={"no_such_kwarg": 1})
    assert info.value.exc_type == "TypeError"
    assert "no_such_kwarg" in str(info.value) and "Traceback" in info.value.worker_traceback
    assert runner.worker_pid == pid and runner.crash_count == 0


def test_a_fatal_gpu_error_replaces_the_worker(runner: MLXSubprocessRunner) -> None:
    pid = runner.worker_pid
    crashes = runner.crash_count
    with pytest.raises(WorkerError) as info:
        inject_worker_fault(runner, "raise", message="[METAL] Command buffer execution failed: Caused GPU "
                            "Address Fault Error (0000000b:kIOGPUCommandBufferCallbackErrorPageFault)")
    assert info.value.error_class.name == "gpu_page_fault"  # type: ignore[attr-defined]
    assert runner.generate("hi", max_tokens=3)
    assert runner.worker_pid != pid  # GPU state untrusted: a fresh worker
    assert runner.crash_count == crashes  # ... but that was not a crash


def test_load_failure_is_a_worker_error_and_releases_the_lock(tmp_path: Path) -> None:
    from metal_guard.lock import read_mlx_lock

    with pytest.raises(WorkerError) as info:
        MLXSubprocessRunner(tmp_path / "no-such-model", load_timeout=60)
    assert info.value.phase == "load"  # type: ignore[attr-defined]
    assert read_mlx_lock() is None


def test_a_runner_dropped_without_shutdown_releases_the_gpu_lock(tiny_model_path: Path) -> None:
    import gc

    from metal_guard.lock import read_mlx_lock

    dropped = MLXSubprocessRunner(tiny_model_path, start=False)
    holder = read_mlx_lock()
    assert holder is not None and holder.get("pid") == os.getpid()
    del dropped
    gc.collect()
    assert read_mlx_lock() is None


# ----------------------------------------------------------------------------- mlx-vlm


def test_vlm_worker_with_an_image_matches_in_process(tiny_vlm_path: Path,
                                                     tiny_image_path: Path) -> None:
    import mlx_vlm

    with MLXSubprocessRunner(tiny_vlm_path, backend="mlx-vlm") as vlm:
        got = vlm.generate("describe", image=tiny_image_path, max_tokens=8, temperature=0.0)
        chunks = list(vlm.stream_generate("describe", image=[str(tiny_image_path)],
                                          max_tokens=8, temperature=0.0))
        text_only = vlm.generate("describe", max_tokens=4, temperature=0.0)
        pid = vlm.worker_pid
        assert vlm.ready_info and vlm.ready_info["backend"] == "mlx-vlm"
    model, processor = mlx_vlm.load(str(tiny_vlm_path))
    prompt = mlx_vlm.apply_chat_template(processor, model.config, "describe", num_images=1)
    want = mlx_vlm.generate(model, processor, prompt, image=[str(tiny_image_path)],
                            max_tokens=8, temperature=0.0, verbose=False).text
    assert got == want and "".join(chunks) == want
    assert isinstance(text_only, str)
    assert pid is not None and not psutil.pid_exists(pid)  # shut down and reaped on exit
