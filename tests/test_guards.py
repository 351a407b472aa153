"""``@guarded_generate`` on plain, generator, async and async-generator functions."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from metal_guard import policy
from metal_guard.errors import MetalOOMError
from metal_guard.guards import guard_policy, guarded_generate
from metal_guard.resources import global_resource_tracker

OOM = "[METAL] Command buffer execution failed: Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)"


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    policy.refresh_settings()  # the hot-path snapshot follows this test's environment
    yield
    policy.refresh_settings()


def count() -> int:
    return global_resource_tracker().count


def test_plain_function_is_guarded_and_keeps_metadata() -> None:
    @guarded_generate
    def answer(question: str, *, loud: bool = False) -> str:
        """Docs."""
        return question.upper() if loud else question

    before = count()
    assert answer("hi", loud=True) == "HI"
    assert count() == before + 1
    assert answer.__name__ == "answer" and answer.__doc__ == "Docs."
    assert list(inspect.signature(answer).parameters) == ["question", "loud"]


def test_policy_keywords_are_visible_inside_and_only_inside() -> None:
    seen: list[Any] = []

    @guarded_generate(model_id="m1", flush_every_n=0)
    def work() -> None:
        seen.append(dict(policy.current_policy()))

    work()
    assert seen == [{"model_id": "m1", "flush_every_n": 0}]
    assert dict(policy.current_policy()) == {}


def test_unknown_policy_key_fails_at_decoration() -> None:
    with pytest.raises(TypeError, match="colour"):
        guarded_generate(colour="red")
    with pytest.raises(ValueError, match="mode"):
        guarded_generate(mode="reckless")


def test_nested_guarded_calls_count_once() -> None:
    @guarded_generate
    def inner() -> int:
        return 1

    @guarded_generate
    def outer() -> int:
        return inner() + inner()

    before = count()
    assert outer() == 2
    assert count() == before + 1
    assert not policy.in_guarded_call()


def test_oom_in_a_plain_function_becomes_metal_oom_error() -> None:
    @guarded_generate
    def boom() -> None:
        raise RuntimeError(OOM)

    with pytest.raises(MetalOOMError) as info:
        boom()
    assert isinstance(info.value.__cause__, RuntimeError)


def test_other_errors_pass_unchanged() -> None:
    @guarded_generate
    def bad() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        bad()


def test_oom_retries_retry_a_plain_call() -> None:
    calls: list[int] = []

    @guarded_generate(oom_retries=2)
    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError(OOM)
        return "ok"

    assert flaky() == "ok" and len(calls) == 3


# --------------------------------------------------------------------------- generators


def _stream(n: int) -> Any:
    @guarded_generate(model_id="gen-model")
    def stream() -> Iterator[Any]:
        received = []
        for i in range(n):
            try:
                got = yield i
            except ValueError as exc:
                got = f"caught {exc}"
            received.append(got)
        return received

    return stream


def test_generator_is_guarded_per_resumption_and_keeps_the_return_value() -> None:
    gen = _stream(3)()
    assert inspect.isgenerator(gen)
    before = count()
    assert next(gen) == 0
    assert count() == before + 1  # counted once, at the first resumption
    assert not policy.in_guarded_call()  # nothing leaks into the consumer between items
    assert dict(policy.current_policy()) == {}
    assert gen.send("a") == 1
    assert gen.throw(ValueError("v")) == 2
    with pytest.raises(StopIteration) as stop:
        gen.send("c")
    assert stop.value.value == ["a", "caught v", "c"]
    assert count() == before + 1


def test_generator_close_reaches_the_wrapped_generator() -> None:
    closed = threading.Event()

    @guarded_generate
    def stream() -> Iterator[int]:
        try:
            yield 1
            yield 2
        finally:
            closed.set()

    gen = stream()
    assert next(gen) == 1
    gen.close()
    assert closed.is_set()


def test_generator_throw_unhandled_propagates() -> None:
    gen = _stream(3)()
    next(gen)
    with pytest.raises(KeyError):
        gen.throw(KeyError("k"))


def test_generator_stepped_from_different_threads() -> None:
    """LangChain's _astream resumes a sync generator on executor threads, one item each."""
    threads: list[str] = []

    @guarded_generate
    def stream() -> Iterator[int]:
        for i in range(6):
            threads.append(threading.current_thread().name)
            yield i

    gen = stream()
    items = []
    for i in range(7):
        with ThreadPoolExecutor(1, thread_name_prefix=f"hop{i}") as pool:
            try:
                items.append(pool.submit(next, gen).result())
            except StopIteration:
                break
    assert items == list(range(6))
    assert len(set(threads)) == 6


def test_oom_in_the_middle_of_a_stream() -> None:
    @guarded_generate
    def stream() -> Iterator[int]:
        yield 1
        raise RuntimeError(OOM)

    gen = stream()
    assert next(gen) == 1
    with pytest.raises(MetalOOMError):
        next(gen)


def test_generator_nested_in_a_guarded_call_is_not_counted_again() -> None:
    stream = _stream(2)

    @guarded_generate
    def collect() -> list[int]:
        return list(stream())

    before = count()
    assert collect() == [0, 1]
    assert count() == before + 1


# --------------------------------------------------------------------------- async


def test_async_function_is_guarded_while_it_runs() -> None:
    seen: list[bool] = []

    @guarded_generate(model_id="a")
    async def work(x: int) -> int:
        await asyncio.sleep(0)
        seen.append(policy.in_guarded_call())
        return x * 2

    assert inspect.iscoroutinefunction(work)
    before = count()
    assert asyncio.run(work(21)) == 42
    assert seen == [True] and count() == before + 1


def test_async_generator_is_guarded_per_resumption() -> None:
    @guarded_generate
    async def stream() -> AsyncIterator[int]:
        for i in range(3):
            await asyncio.sleep(0)
            yield i

    async def consume() -> tuple[list[int], list[bool]]:
        out, between = [], []
        async for item in stream():
            out.append(item)
            between.append(policy.in_guarded_call())
        return out, between

    before = count()
    items, between = asyncio.run(consume())
    assert items == [0, 1, 2] and between == [False, False, False]
    assert count() == before + 1


def test_async_oom_becomes_metal_oom_error() -> None:
    @guarded_generate
    async def boom() -> None:
        raise RuntimeError(OOM)

    with pytest.raises(MetalOOMError):
        asyncio.run(boom())


# --------------------------------------------------------------------------- methods, stacking


def test_methods_and_stacked_guards() -> None:
    class Chat:
        def __init__(self) -> None:
            self.calls = 0

        @guarded_generate(model_id="chat")
        def reply(self, text: str) -> str:
            self.calls += 1
            return text[::-1]

        @guarded_generate
        def seen(self) -> dict[str, Any]:
            return dict(policy.current_policy())

    chat = Chat()
    before = count()
    with guard_policy(model_id="outer", flush_every_n=0):
        assert chat.reply("abc") == "cba"
        inner = chat.seen()
    assert chat.calls == 1 and count() == before + 2
    assert inner == {"model_id": "outer", "flush_every_n": 0}


def test_kill_switch_turns_decorators_into_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_DISABLED", "1")
    policy.refresh_settings()

    @guarded_generate
    def boom() -> None:
        raise RuntimeError(OOM)

    before = count()
    with pytest.raises(RuntimeError) as info:
        boom()
    assert not isinstance(info.value, MetalOOMError)
    assert count() == before


def test_reexports() -> None:
    from metal_guard import guards
    from metal_guard.bench import bench_scoped_load

    assert guards.bench_scoped_load is bench_scoped_load
    from metal_guard.isolation.context import isolated_model

    assert guards.isolated_model is isolated_model


def test_suppressed_lets_every_guard_through() -> None:
    from metal_guard.guards import suppressed

    @guarded_generate
    def boom() -> None:
        raise RuntimeError(OOM)

    before = count()
    with suppressed(), pytest.raises(RuntimeError) as info:
        boom()
    assert not isinstance(info.value, MetalOOMError) and count() == before
    with pytest.raises(MetalOOMError):
        boom()
