"""MLX thread hygiene: threads that ran MLX clear their streams, so the process exits cleanly.

On MLX 0.32, a thread that created MLX streams and exits without ``mx.clear_streams()`` can make
the process die at exit with ``terminate called without an active exception`` (rc 134). The
race shows under CPU contention, so the loop test runs with three ``while True: pass``
processes beside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from metal_guard import backend, threads


@pytest.fixture
def cleared(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Native ids of the threads on which metal-guard cleared MLX streams (the real call runs)."""
    seen: list[int] = []
    real = backend.clear_streams

    def spy() -> bool:
        seen.append(threading.get_native_id())
        return real()

    monkeypatch.setattr(backend, "clear_streams", spy)
    return seen


def test_clear_streams_never_imports_mlx() -> None:
    code = ("import sys; from metal_guard import backend; "
            "print(backend.clear_streams(), 'mlx.core' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_clear_streams_clears_this_threads_streams() -> None:
    mx = pytest.importorskip("mlx.core")

    def work() -> bool:
        mx.eval(mx.ones(4) * 2)  # creates this thread's stream
        return backend.clear_streams()

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(work).result() is True


def test_registration_is_once_per_thread_and_never_on_the_main_thread(cleared: list[int]) -> None:
    assert threads.clear_streams_at_thread_exit() is False  # the main thread: MLX's own handlers
    results: list[Any] = []

    def work() -> None:
        results.append(threads.clear_streams_at_thread_exit())
        results.append(threads.clear_streams_at_thread_exit())
        results.append(threads.registered_here())
        results.append(threading.get_native_id())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    first, second, registered, native = results
    assert (first, second, registered) == (True, False, True)
    assert cleared == [native]  # cleared once, at the thread's exit, on that very thread


def test_clearing_streams_wrapper_runs_even_when_the_target_raises(cleared: list[int]) -> None:
    natives: list[int] = []

    def boom() -> None:
        natives.append(threading.get_native_id())
        raise RuntimeError("target failed")

    raised: list[BaseException] = []

    def run() -> None:  # on a thread of its own: clearing the main thread's streams would
        try:            # break every later MLX call of this test process
            threads.clearing_streams(boom)()
        except RuntimeError as exc:
            raised.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert len(raised) == 1 and "target failed" in str(raised[0])
    assert cleared == natives and len(natives) == 1 and natives[0] != threading.get_native_id()


def test_a_guarded_call_in_a_user_pool_registers_the_cleanup(cleared: list[int],
                                                             tiny_model_path: Path) -> None:
    pytest.importorskip("mlx_lm")
    import mlx_lm

    from metal_guard import installer

    installer.install(adapters=["mlx_lm"], cadence=False)
    try:
        model, tokenizer = mlx_lm.load(str(tiny_model_path))

        def work() -> tuple[bool, int]:
            text = "".join(r.text for r in mlx_lm.stream_generate(model, tokenizer, "hi", max_tokens=3))
            return threads.registered_here() and bool(text), threading.get_native_id()

        with ThreadPoolExecutor(1) as pool:
            registered, native = pool.submit(work).result()
    finally:
        installer.uninstall()
    assert registered is True
    assert native in cleared


def test_unguarded_process_registers_nothing(cleared: list[int]) -> None:
    def work() -> bool:
        return threads.registered_here()

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(work).result() is False
    assert cleared == []


# --------------------------------------------------------------------------- the abort loop

#: Every case in one fresh interpreter: each leaves a thread (or pool) that ran MLX and ended.
CASES = textwrap.dedent("""
    import asyncio, sys, threading, warnings
    warnings.simplefilter("ignore")
    import metal_guard
    metal_guard.install(cadence=False)
    import mlx_lm
    from langchain_community.chat_models.mlx import ChatMLX
    from langchain_community.llms.mlx_pipeline import MLXPipeline
    from langchain_core.messages import HumanMessage

    path = sys.argv[1]
    done = []
    llm = MLXPipeline.from_model_id(path, pipeline_kwargs={"max_tokens": 6})
    model, tokenizer = llm.model, llm.tokenizer

    async def astream():
        return [c async for c in llm.astream("hello")]
    if asyncio.run(astream()):
        done.append("astream")

    chat = ChatMLX(llm=llm)
    if len(chat.batch([[HumanMessage(content="a")], [HumanMessage(content="b")]])) == 2:
        done.append("batch")

    out = []
    def raw():
        out.append("".join(r.text for r in mlx_lm.stream_generate(model, tokenizer, "hi", max_tokens=6)))
    t = threading.Thread(target=raw)
    t.start(); t.join()
    if out:
        done.append("thread")

    async def to_thread():
        return await asyncio.to_thread(mlx_lm.generate, model, tokenizer, "hey", max_tokens=6)
    if isinstance(asyncio.run(to_thread()), str):
        done.append("to_thread")
    print(",".join(done))
""")

RUNS = 20
PARALLEL = 2
BUSY = 3


@pytest.fixture
def contention() -> Iterator[None]:
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(BUSY)]
    try:
        yield
    finally:
        for proc in busy:
            proc.kill()
        for proc in busy:
            proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_threads_that_ran_mlx_never_abort_the_process_at_exit(tiny_model_path: Path, tmp_path: Path,
                                                              contention: None) -> None:
    """astream, ChatMLX.batch, a plain thread and asyncio.to_thread, guarded: 20 fresh
    interpreters beside three busy processes, every one exits 0 with every case done."""
    pytest.importorskip("langchain_community")
    script = tmp_path / "cases.py"
    script.write_text(CASES)
    env = dict(os.environ, METALGUARD_HOME=str(tmp_path / "home"))

    def run(_: int) -> tuple[int, str, str]:
        proc = subprocess.run([sys.executable, str(script), str(tiny_model_path)], capture_output=True,
                              text=True, env=env, timeout=600, cwd=tmp_path)
        return proc.returncode, proc.stdout.strip(), proc.stderr[-2000:]

    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(run, range(RUNS)))
    failures = [(rc, err) for rc, _, err in results if rc != 0]
    assert not failures, f"{len(failures)}/{RUNS} runs failed: {failures[0]}"
    assert all(out.splitlines()[-1] == "astream,batch,thread,to_thread" for _, out, _ in results)
