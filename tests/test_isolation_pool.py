"""call_model_isolated (pooled seed API), shutdown_all_workers, isolated_model and the GPU lock."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support import wait_for

from metal_guard.errors import MLXLockConflict, WorkerError
from metal_guard.isolation import (
    MLXSubprocessRunner,
    call_model_isolated,
    current_isolated_model,
    isolated_model,
    shutdown_all_workers,
)
from metal_guard.isolation.pool import pooled_runners
from metal_guard.lock import read_mlx_lock
from metal_guard.testing import worker_fault_env

FAULTS = worker_fault_env()


def _gone(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def clean_pool() -> Iterator[None]:
    yield
    shutdown_all_workers()


def test_call_model_isolated_pools_one_worker_per_model_and_raises_typed_errors(
        tiny_model_path: Path, clean_pool: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_BREAKER_THRESHOLD", "100")  # two stalls below are on purpose
    model = str(tiny_model_path)
    opts = {"runner_options": {"env": FAULTS}}
    first = call_model_isolated("hello", model, max_tokens=6, temperature=0.0, **opts)
    assert isinstance(first, str) and first
    runner = pooled_runners()[(model, "mlx-lm")]
    pid = runner.worker_pid
    # same (model, backend): same persistent worker; seed-style arguments are honoured
    assert call_model_isolated("hello", model, max_tokens=6, temperature=0.0) == first
    assert call_model_isolated("hello", model, backend="mlx", max_tokens=6,
                               temperature=0.0, system="") == first
    assert runner.worker_pid == pid and len(pooled_runners()) == 1
    # a failure raises a typed error by default ...
    with pytest.raises(WorkerError, match="no_such_kwarg"):
        call_model_isolated("x", model, max_tokens=3, extra={"no_such_kwarg": 1})
    assert call_model_isolated("x", model, max_tokens=3, extra={"no_such_kwarg": 1},
                               default="") == ""
    assert runner.worker_pid == pid  # a Python exception in the worker does not cost it
    # ... and returns the default when asked to (the seed's behaviour), here for a stall
    assert call_model_isolated("slow", model, max_tokens=3, timeout=0.5, default="",
                               _debug_token_delay_sec=2.0) == ""
    # the pooled runner respawned its worker and keeps answering
    assert call_model_isolated("hello", model, max_tokens=6, temperature=0.0) == first
    assert runner.worker_pid != pid and runner.crash_count == 0
    # bad arguments always raise, default or not
    with pytest.raises(TypeError):
        call_model_isolated("x", model, default="", temprature=1)
    with pytest.raises(TypeError, match=r"\(prompt, model\)"):
        call_model_isolated("x", None, default="")  # type: ignore[arg-type]
    # shutdown_all_workers stops every worker, pooled or not, and releases the GPU lock
    pid = runner.worker_pid
    assert read_mlx_lock() is not None
    assert shutdown_all_workers() == 1
    assert runner.closed and pooled_runners() == {} and _gone(pid)
    assert read_mlx_lock() is None


def test_start_failures_raise_or_return_the_default(tmp_path: Path, clean_pool: None) -> None:
    model = str(tmp_path / "m")
    opts = {"env": FAULTS, "load_kwargs": {"_debug_fault": "raise"}}
    with pytest.raises(WorkerError, match="debug fault"):  # the load failed in the worker
        call_model_isolated("x", model, max_tokens=2, runner_options=opts)
    assert call_model_isolated("x", model, max_tokens=2, default=None,
                               runner_options=opts) is None
    assert pooled_runners() == {}  # a runner that failed to start is not pooled


HOLDER = textwrap.dedent("""
    import sys, time
    from metal_guard.lock import acquire_mlx_lock
    acquire_mlx_lock("another GPU user")
    print("held", flush=True)
    time.sleep(60)
""")


def test_gpu_lock_held_elsewhere_refuses_a_worker(tmp_path: Path, clean_pool: None) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = psutil.Process().children()
        with pytest.raises(MLXLockConflict):
            MLXSubprocessRunner(tmp_path / "m")
        assert call_model_isolated("x", str(tmp_path / "m"), default="") == ""
        assert psutil.Process().children() == before  # no worker was started
    finally:
        holder.kill()
        holder.wait()


def test_isolated_model_is_a_dedicated_worker_for_the_block(tiny_model_path: Path) -> None:
    assert current_isolated_model() is None
    with isolated_model(tiny_model_path, generate_timeout=30) as m:
        assert current_isolated_model() is m
        lock = read_mlx_lock()
        assert lock is not None and lock["pid"] == os.getpid()
        assert "mlx_subprocess_runner" in lock["label"]
        text = "".join(m.stream_generate("hi", max_tokens=5, temperature=0.0))
        assert text == m.generate("hi", max_tokens=5, temperature=0.0)
        pid = m.worker_pid
        assert pooled_runners() == {}  # not the pool's worker
    assert current_isolated_model() is None
    assert m.closed and _gone(pid) and read_mlx_lock() is None
    with pytest.raises(RuntimeError, match="shut down"):
        m.generate("again")


def test_isolated_model_cleans_up_on_error_and_nests(tiny_model_path: Path) -> None:
    with pytest.raises(KeyError):
        with isolated_model(tiny_model_path) as outer:
            pid = outer.worker_pid
            with isolated_model(tiny_model_path, start=False) as inner:
                assert current_isolated_model() is inner
            assert current_isolated_model() is outer  # the inner block restored the outer
            assert inner.closed and not outer.closed
            raise KeyError("boom")
    assert outer.closed and _gone(pid) and current_isolated_model() is None
    assert read_mlx_lock() is None  # two references taken, two released


EXITS = textwrap.dedent("""
    import sys
    from metal_guard.isolation import MLXSubprocessRunner
    runner = MLXSubprocessRunner(sys.argv[1])
    runner.generate("hi", max_tokens=2)
    print(runner.worker_pid, "mlx" in sys.modules, flush=True)  # the parent never imports MLX
    # no shutdown(): the atexit hook must stop the worker cleanly
""")


def test_workers_are_shut_down_cleanly_at_interpreter_exit(tiny_model_path: Path,
                                                          tmp_path: Path) -> None:
    script = tmp_path / "exits.py"
    script.write_text(EXITS)
    out = subprocess.run([sys.executable, str(script), str(tiny_model_path)], check=True,
                         capture_output=True, text=True, timeout=120)
    pid_text, parent_imported_mlx = out.stdout.split()
    pid = int(pid_text)
    assert parent_imported_mlx == "False"
    wait_for(lambda: _gone(pid), what=f"worker {pid} to exit after its parent")
    workers = Path(os.environ["METALGUARD_HOME"]) / "cache" / "workers"
    assert list(workers.glob("*.log")) == []  # clean exits leave no crash log behind
    assert "Traceback" not in out.stderr


def test_an_abandoned_runner_does_not_leak_its_worker(tiny_model_path: Path) -> None:
    import gc

    runner = MLXSubprocessRunner(tiny_model_path, use_lock=False)
    pid = runner.worker_pid
    del runner  # never shut down
    gc.collect()
    wait_for(lambda: _gone(pid), what=f"the abandoned runner's worker {pid} to exit")


def test_shutdown_with_a_stream_still_open(tiny_model_path: Path) -> None:
    runner = MLXSubprocessRunner(tiny_model_path, use_lock=False)
    pid = runner.worker_pid
    stream = runner.stream_generate("go on", max_tokens=1_000_000, temperature=0.0)
    next(stream)
    start = time.monotonic()
    runner.shutdown()  # from the thread that holds the open stream
    assert time.monotonic() - start < 4.0 and _gone(pid)
    with pytest.raises(WorkerError, match="shut down"):
        for _ in stream:
            pass
    assert runner._handle.chan is None  # the channel was closed once the stream ended


def test_pooled_call_defaults_are_mlx_lms() -> None:
    import inspect

    params = inspect.signature(call_model_isolated).parameters
    assert params["max_tokens"].default == 256 and params["temperature"].default == 0.0
