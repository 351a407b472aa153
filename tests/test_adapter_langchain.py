"""The LangChain adapter: real ``ChatMLX`` / ``MLXPipeline`` on the tiny model with install()
active (langchain-community 0.4.2 on mlx-lm 0.32), and the callback handler on any LLM."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mlx_lm")
pytest.importorskip("langchain_core")
pytest.importorskip("langchain_community")

from langchain_core.messages import HumanMessage

from metal_guard import installer as mg
from metal_guard.adapters.base import count_guards
from metal_guard.errors import MetalOOMError, PanicCooldownActive
from metal_guard.resources import global_resource_tracker

OOM_TEXT = ("[METAL] Command buffer execution failed: Insufficient Memory "
            "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory).")


def _classes() -> tuple[Any, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # langchain-community's sunset notice
        from langchain_community.chat_models.mlx import ChatMLX
        from langchain_community.llms.mlx_pipeline import MLXPipeline
    return MLXPipeline, ChatMLX


@pytest.fixture
def installed() -> Iterator[Any]:
    mg.install(cadence=False)
    from metal_guard.adapters.langchain import callback_handler

    handler = callback_handler()
    handler.reset()
    try:
        yield handler
    finally:
        mg.uninstall()


@pytest.fixture
def chat(installed: Any, tiny_model_path: Path) -> Any:
    MLXPipeline, ChatMLX = _classes()
    llm = MLXPipeline.from_model_id(str(tiny_model_path), pipeline_kwargs={"max_tokens": 6})
    return ChatMLX(llm=llm)


def test_sites_guarded_once_and_removed_by_uninstall(tiny_model_path: Path) -> None:
    MLXPipeline, ChatMLX = _classes()
    from metal_guard.knowledge.patches import defensive_patch_status

    mg.install(cadence=False)
    mg.install(cadence=False)  # idempotent
    try:
        assert mg.adapter_report()["adapters"]["langchain"]["state"] == "patched"
        for cls, name in ((MLXPipeline, "_call"), (MLXPipeline, "_stream"), (ChatMLX, "_generate"),
                          (ChatMLX, "_stream"), (ChatMLX, "_agenerate")):
            assert count_guards(vars(cls)[name]) == 1, name
        assert defensive_patch_status()["langchain_mlx_pipeline"] is True
    finally:
        mg.uninstall()
    for cls, name in ((MLXPipeline, "_call"), (ChatMLX, "_stream")):
        assert count_guards(vars(cls)[name]) == 0
    assert defensive_patch_status()["langchain_mlx_pipeline"] is False


def test_chatmlx_invoke_and_stream_work_and_carry_the_model_id(chat: Any, installed: Any,
                                                               tiny_model_path: Path) -> None:
    tracker = global_resource_tracker()
    before = tracker.count
    reply = chat.invoke([HumanMessage(content="hi")])
    assert isinstance(reply.content, str) and reply.content
    assert tracker.count == before + 1  # ChatMLX -> MLXPipeline._call -> mlx_lm: guarded once
    chunks = [c.content for c in chat.stream([HumanMessage(content="hi")])]
    assert "".join(chunks) == reply.content  # greedy: streaming gives the same text
    assert tracker.count == before + 2

    # per-object context: the guard published memory under the LangChain object's model id
    from metal_guard.heartbeat import read_published_memory

    labels = {h.get("label") for h in read_published_memory()}
    assert str(tiny_model_path) in labels

    stats = installed.stats()
    row = stats["by_llm"]["langchain_community.chat_models.mlx.ChatMLX[mlx-chat-wrapper]"]
    assert row["calls"] == 2 and row["completed"] == 2 and row["streamed_tokens"] >= 6
    assert stats["in_flight"] == 0


def test_pipeline_invoke_and_stream(installed: Any, tiny_model_path: Path) -> None:
    MLXPipeline, _ = _classes()
    llm = MLXPipeline.from_model_id(str(tiny_model_path), pipeline_kwargs={"max_tokens": 5})
    text = llm.invoke("the quick brown fox")
    assert text and "".join(llm.stream("the quick brown fox")) == text


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_async_paths(chat: Any) -> None:
    async def main() -> tuple[str, list[str]]:
        reply = await chat.ainvoke([HumanMessage(content="hi")])
        pieces = [c.content async for c in chat.astream([HumanMessage(content="hi")])]
        return str(reply.content), [str(p) for p in pieces]

    tracker = global_resource_tracker()
    before = tracker.count
    text, pieces = asyncio.run(main())
    assert text and "".join(pieces) == text
    assert tracker.count == before + 2


class _ThreadRecordingModel:
    """The real model, noting the thread of every forward pass (where MLX actually runs)."""

    def __init__(self, real: Any, seen: list[str]) -> None:
        self._real = real
        self._seen = seen

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import threading

        self._seen.append(threading.current_thread().name)
        return self._real(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_async_stream_is_pinned_to_one_thread_and_closed_there(chat: Any) -> None:
    """Every forward pass of an ``astream`` runs on the one pump thread. (LangChain's own
    token callbacks go through its executor, whose thread may change under load: they say
    nothing about where the model runs, so the model itself is observed.)"""
    import threading

    seen: list[str] = []

    async def consume(limit: int | None) -> int:
        n = 0
        async for _chunk in chat.astream([HumanMessage(content="hi")]):
            n += 1
            if limit is not None and n >= limit:
                break  # the consumer stops early: the generator is closed on its thread
        return n

    real = chat.llm.model
    chat.llm.model = _ThreadRecordingModel(real, seen)
    try:
        assert asyncio.run(consume(None)) >= 6
        assert len(seen) >= 6 and set(seen) == {"metal-guard-langchain-stream"}, seen
        assert asyncio.run(consume(2)) == 2
    finally:
        chat.llm.model = real
    for thread in threading.enumerate():
        if thread.name == "metal-guard-langchain-stream":
            thread.join(timeout=10)
            assert not thread.is_alive()


class _FailingModel:
    """The real model, except that running it hits a Metal OOM (as MLX 0.32 raises it)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(OOM_TEXT)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_oom_in_a_langchain_call_is_translated_and_classified(chat: Any, installed: Any,
                                                              tiny_model_path: Path) -> None:
    real = chat.llm.model
    chat.llm.model = _FailingModel(real)
    try:
        with pytest.raises(MetalOOMError) as info:
            chat.invoke([HumanMessage(content="hi")])
        assert "Metal OOM in langchain_community.chat_models.mlx:ChatMLX" in str(info.value)
    finally:
        chat.llm.model = real
    stats = installed.stats()
    assert stats["total"]["failed"] == 1
    assert sum(stats["errors_by_class"].values()) == 1 and "other" not in stats["errors_by_class"]
    from metal_guard.breadcrumbs import tail

    crumbs = tail(20)
    oom = [c for c in crumbs if c.tag == "OOM_RECOVERY"]
    assert oom and oom[-1].meta["model"] == str(tiny_model_path)
    assert any(c.tag == "LANGCHAIN_ERROR" for c in crumbs)
    assert chat.invoke([HumanMessage(content="hi")]).content  # and it works again


def test_handler_vetoes_local_models_during_a_panic_cooldown(chat: Any, installed: Any) -> None:
    from langchain_core.language_models.fake import FakeListLLM

    from metal_guard.forensics.gate import mark_panic_sentinel_cooldown

    mark_panic_sentinel_cooldown(1.0, reason="test")
    with pytest.raises(PanicCooldownActive):
        chat.invoke([HumanMessage(content="hi")])
    # a remote-style model is not blocked by a local GPU condition, only recorded
    fake = FakeListLLM(responses=["remote answer"])
    assert fake.invoke("hello") == "remote answer"
    stats = installed.stats()
    assert stats["total"]["refused"] == 1
    fake_rows = [v for k, v in stats["by_llm"].items() if "FakeListLLM" in k or "fake-list" in k]
    assert fake_rows and fake_rows[0]["completed"] == 1


def test_observer_mode_never_vetoes(monkeypatch: pytest.MonkeyPatch, chat: Any) -> None:
    from metal_guard.forensics.gate import mark_panic_sentinel_cooldown
    from metal_guard.policy import refresh_settings

    mark_panic_sentinel_cooldown(1.0, reason="test")
    monkeypatch.setenv("METALGUARD_MODE", "observer")
    refresh_settings()
    try:
        assert chat.invoke([HumanMessage(content="hi")]).content
    finally:
        monkeypatch.delenv("METALGUARD_MODE")
        refresh_settings()


def test_handler_reaches_any_llm_and_stops_after_uninstall() -> None:
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.tracers.context import _configure_hooks

    from metal_guard.adapters.langchain import _HandlerVar, callback_handler

    model = FakeListChatModel(responses=["a", "b", "c"])
    handler = callback_handler()
    mg.install()
    try:
        handler.reset()
        model.invoke("x")
        assert handler.stats()["total"]["completed"] == 1
    finally:
        mg.uninstall()
    mg.install()
    mg.uninstall()  # registering again never adds a second hook
    assert sum(isinstance(v, _HandlerVar) for v, *_ in _configure_hooks) == 1
    model.invoke("y")
    assert handler.stats()["total"]["calls"] == 1  # not installed: the handler is not added


def test_explicit_handler_is_not_doubled_by_the_hook(installed: Any) -> None:
    from langchain_core.language_models.fake import FakeListLLM

    from metal_guard.adapters.langchain import MetalGuardCallbackHandler

    mine = MetalGuardCallbackHandler(veto="none")
    FakeListLLM(responses=["ok"]).invoke("x", config={"callbacks": [mine]})
    assert mine.stats()["total"]["completed"] == 1
    assert installed.stats()["total"]["calls"] == 0  # the hook saw an instance and stood back
    with pytest.raises(ValueError):
        MetalGuardCallbackHandler(veto="sometimes")


def _fresh(code: str, *prefix: str) -> dict[str, Any]:
    import json
    import os
    import subprocess
    import sys
    import textwrap

    proc = subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=180, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "probe failed" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_install_before_import_in_a_fresh_interpreter(tiny_model_path: Path) -> None:
    out = _fresh(f"""
        import json, sys, warnings
        from metal_guard import installer as mg
        mg.install(cadence=False)
        assert "langchain_community" not in sys.modules and "wrapt" not in sys.modules
        warnings.simplefilter("ignore", DeprecationWarning)
        from langchain_community.chat_models.mlx import ChatMLX
        from langchain_community.llms.mlx_pipeline import MLXPipeline
        from langchain_core.messages import HumanMessage
        from metal_guard.adapters.base import count_guards
        from metal_guard.knowledge.patches import defensive_patch_status
        chat = ChatMLX(llm=MLXPipeline.from_model_id({str(tiny_model_path)!r},
                                                     pipeline_kwargs={{"max_tokens": 4}}))
        text = chat.invoke([HumanMessage(content="hi")]).content
        streamed = "".join(c.content for c in chat.stream([HumanMessage(content="hi")]))
        print(json.dumps({{"same": text == streamed and bool(text),
                          "guards": [count_guards(vars(ChatMLX)["_generate"]),
                                     count_guards(vars(MLXPipeline)["_call"])],
                          "patches": defensive_patch_status()}}))
    """)
    assert out["same"] is True and out["guards"] == [1, 1]
    assert out["patches"]["langchain_mlx_pipeline"] and out["patches"]["langchain_chat_mlx"]


def test_zero_code_activation_reaches_any_langchain_llm() -> None:
    """`metal-guard run`: importing langchain_core alone activates the handler hook."""
    import sys

    out = _fresh("""
        import json
        from langchain_core.language_models.fake import FakeListLLM
        FakeListLLM(responses=["ok"]).invoke("x")
        from metal_guard.adapters.langchain import callback_handler
        from metal_guard import installer as mg
        print(json.dumps({"installed": mg.is_installed(),
                          "completed": callback_handler().stats()["total"]["completed"]}))
    """, sys.executable, "-m", "metal_guard", "run", "--")
    assert out == {"installed": True, "completed": 1}
