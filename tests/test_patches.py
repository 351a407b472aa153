"""Upstream defensive patches.

The LangChain acceptance test runs in a fresh subprocess against the real installed
langchain-community + mlx-lm and the tiny model: ``MLXPipeline.invoke/stream`` and
``ChatMLX.invoke/stream`` fail before the patches and work after them. Everything patched
in this process is uninstalled again by the tests that patch.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from metal_guard.knowledge import patches
from metal_guard.knowledge._langchain_mlx import StopFilter
from metal_guard.knowledge.patches import (
    PatchState,
    defensive_patch_status,
    install_upstream_defensive_patches,
    uninstall_upstream_defensive_patches,
)

CHILD = r'''
import json, sys, warnings
warnings.simplefilter("ignore")
from langchain_community.llms.mlx_pipeline import MLXPipeline
from langchain_community.chat_models.mlx import ChatMLX
from langchain_core.messages import HumanMessage, SystemMessage
from metal_guard.knowledge.patches import (install_upstream_defensive_patches,
                                            uninstall_upstream_defensive_patches)

res = {}
def attempt(label, fn):
    try:
        res[label] = {"ok": True, "value": fn()}
    except Exception as exc:
        res[label] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

llm = MLXPipeline.from_model_id(sys.argv[1], pipeline_kwargs={"max_tokens": 12})
chat = ChatMLX(llm=llm)
msgs = [SystemMessage("be brief"), HumanMessage("hello")]

def run(prefix):
    attempt(prefix + "pipeline.invoke", lambda: llm.invoke("hello world"))
    attempt(prefix + "pipeline.stream", lambda: [c for c in llm.stream("hello world")])
    attempt(prefix + "chat.invoke", lambda: chat.invoke(msgs).content)
    attempt(prefix + "chat.stream", lambda: [c.content for c in chat.stream(msgs)])

run("before.")
res["install"] = {k: [str(v), v.reason] for k, v in install_upstream_defensive_patches().items()}
run("after.")
res["install_again"] = {k: [str(v), v.reason] for k, v in install_upstream_defensive_patches().items()}

import mlx_lm
from mlx_lm.sample_utils import make_sampler
res["reference"] = mlx_lm.generate(llm.model, llm.tokenizer, "hello world", max_tokens=12,
                                   sampler=make_sampler(0.0))
ref = res["reference"]
stop = ref[3:5]
res["stop"] = stop
attempt("after.stop.invoke", lambda: llm.invoke("hello world", stop=[stop]))
attempt("after.stop.stream", lambda: "".join(llm.stream("hello world", stop=[stop])))
attempt("after.short.invoke", lambda: llm.invoke("hello world", pipeline_kwargs={"max_tokens": 3}))
attempt("after.short.stream", lambda: list(llm.stream("hello world", pipeline_kwargs={"max_tokens": 3})))
attempt("after.penalty", lambda: llm.invoke("hello world", pipeline_kwargs={
    "max_tokens": 12, "repetition_penalty": 5.0, "repetition_context_size": 4}))
attempt("after.sampled", lambda: llm.invoke("hello world", pipeline_kwargs={
    "max_tokens": 5, "temp": 0.8, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "formatter": print}))
attempt("after.chat.kwargs", lambda: "".join(
    c.content for c in chat.stream(msgs, model_kwargs={"max_tokens": 2})))
import asyncio
async def astream():
    return [c async for c in llm.astream("hello world")]
attempt("after.pipeline.astream", lambda: asyncio.run(astream()))
attempt("after.chat.ainvoke", lambda: asyncio.run(chat.ainvoke(msgs)).content)
res["uninstall"] = uninstall_upstream_defensive_patches()
run("uninstalled.")
print("RESULT " + json.dumps(res))
'''


@pytest.fixture(scope="module")
def child(tiny_model_path: Path) -> dict[str, Any]:
    pytest.importorskip("langchain_community")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tiny_model_path)],
                          capture_output=True, text=True, timeout=240)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stderr[-3000:]
    return json.loads(line[len("RESULT "):])  # type: ignore[no-any-return]


def test_langchain_mlx_fails_before_the_patches(child: dict[str, Any]) -> None:
    for prefix in ("before.", "uninstalled."):
        for label in ("pipeline.invoke", "pipeline.stream", "chat.invoke", "chat.stream"):
            assert not child[prefix + label]["ok"], (prefix + label, child[prefix + label])
        assert "formatter" in child[prefix + "pipeline.invoke"]["error"]
        assert "formatter" in child[prefix + "chat.invoke"]["error"]
        assert child[prefix + "pipeline.stream"]["error"].startswith("ImportError")
        assert "generate_step" in child[prefix + "chat.stream"]["error"]


def test_langchain_mlx_works_after_the_patches(child: dict[str, Any]) -> None:
    assert child["install"]["langchain_mlx_pipeline"][0] == "applied"
    assert child["install"]["langchain_chat_mlx"][0] == "applied"
    assert child["install"]["mlx_lm_1128_think_start_id"][0] == "not-needed"
    ref = child["reference"]
    assert ref, "the tiny model produced no text"
    invoke, stream = child["after.pipeline.invoke"], child["after.pipeline.stream"]
    assert invoke["ok"] and stream["ok"], (invoke, stream)
    assert invoke["value"] == ref  # greedy by default, same text as mlx_lm.generate
    assert "".join(stream["value"]) == ref and len(stream["value"]) > 1
    chat_invoke, chat_stream = child["after.chat.invoke"], child["after.chat.stream"]
    assert chat_invoke["ok"] and chat_stream["ok"], (chat_invoke, chat_stream)
    assert chat_invoke["value"] and "".join(chat_stream["value"]) == chat_invoke["value"]
    assert child["after.pipeline.astream"]["ok"] and "".join(child["after.pipeline.astream"]["value"]) == ref
    assert child["after.chat.ainvoke"]["ok"] and child["after.chat.ainvoke"]["value"] == chat_invoke["value"]


def test_install_is_idempotent_and_uninstall_restores(child: dict[str, Any]) -> None:
    assert child["install_again"]["langchain_mlx_pipeline"] == ["applied", "already installed"]
    assert child["uninstall"]["langchain_mlx_pipeline"] == "removed"
    assert child["uninstall"]["langchain_chat_mlx"] == "removed"


def test_pipeline_kwargs_and_stop_are_honoured(child: dict[str, Any]) -> None:
    ref, stop = child["reference"], child["stop"]
    expected = ref[: ref.find(stop)]
    assert child["after.stop.invoke"]["value"] == expected
    assert child["after.stop.stream"]["value"] == expected
    short = child["after.short.invoke"]["value"]
    assert ref.startswith(short) and len(short) < len(ref)
    assert len(child["after.short.stream"]["value"]) <= 3
    assert child["after.penalty"]["ok"] and child["after.penalty"]["value"] != ref
    assert child["after.sampled"]["ok"], child["after.sampled"]
    assert child["after.chat.kwargs"]["ok"]
    assert len(child["after.chat.kwargs"]["value"]) < len(child["after.chat.invoke"]["value"])


# --------------------------------------------------------------------------- in-process units


def _feed(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    f = StopFilter(stops)
    out = [f.feed(p) for p in pieces]
    out.append(f.flush())
    return [o for o in out if o], f.stopped


def test_stop_filter() -> None:
    assert _feed([], ["ab", "cd"]) == (["ab", "cd"], False)
    assert _feed(["END"], ["hello E", "N", "D tail"]) == (["hello "], True)
    assert _feed(["END"], ["hello E", "Nx"]) == (["hello ", "ENx"], False)
    text, stopped = _feed(["\n\n", "###"], ["a\n", "b##", "#c"])
    assert "".join(text) == "a\nb" and stopped
    assert _feed(["x"], ["x"]) == ([], True)


def test_patch_state_is_a_string_truthy_only_when_applied() -> None:
    applied, skipped = PatchState("applied", "ok"), PatchState("not-needed", "fixed upstream")
    assert applied == "applied" and bool(applied) and applied.reason == "ok"
    assert skipped == "not-needed" and not skipped
    assert json.dumps({"a": skipped}) == '{"a": "not-needed"}'


def test_think_patch_is_gated_and_probed_on_the_real_mlx_lm() -> None:
    result = install_upstream_defensive_patches(patches=["mlx_lm_1128_think_start_id"])
    state = result["mlx_lm_1128_think_start_id"]
    assert state == "not-needed" and "advisory range" in state.reason
    forced = install_upstream_defensive_patches(force=True, patches=["mlx_lm_1128_think_start_id"])
    assert forced["mlx_lm_1128_think_start_id"] == "not-needed"
    assert "does not have the bug" in forced["mlx_lm_1128_think_start_id"].reason
    with pytest.raises(ValueError, match="unknown patch"):
        install_upstream_defensive_patches(patches=["nope"])


class BuggyWrapper:
    """Shaped like mlx-lm 0.31.2's TokenizerWrapper (the mlx-lm#1128 bug)."""

    def __init__(self, start: tuple[int, ...] | None) -> None:
        self._think_start_tokens = start
        self._think_end_tokens = start

    @property
    def think_start_id(self) -> int | None:
        if len(self._think_start_tokens) > 1:  # type: ignore[arg-type]
            raise ValueError("more than one token")
        return self._think_start_tokens[0]  # type: ignore[index]

    @property
    def think_end_id(self) -> int | None:
        if len(self._think_end_tokens) > 1:  # type: ignore[arg-type]
            raise ValueError("more than one token")
        return self._think_end_tokens[0]  # type: ignore[index]


@pytest.fixture
def fake_patches(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``add(patch)`` registers a test patch; everything added is uninstalled afterwards."""
    added: list[patches.Patch] = []

    def add(patch: patches.Patch) -> None:
        added.append(patch)
        monkeypatch.setattr(patches, "PATCHES", (*patches.PATCHES, patch))

    yield add
    uninstall_upstream_defensive_patches(patches=[p.name for p in added])


def test_think_patch_fixes_a_buggy_tokenizer_wrapper(fake_patches: Any) -> None:
    fake = patches.Patch("fake_1128", "mlx-lm", "none", "test", lambda: [
        (BuggyWrapper, "think_start_id"), (BuggyWrapper, "think_end_id")],
        patches._think_broken, patches._think_build)
    fake_patches(fake)
    with pytest.raises(TypeError):
        _ = BuggyWrapper(None).think_start_id
    state = install_upstream_defensive_patches(force=True, patches=["fake_1128"])["fake_1128"]
    assert state == "applied", state.reason
    assert BuggyWrapper(None).think_start_id is None
    assert BuggyWrapper(None).think_end_id is None
    assert BuggyWrapper((7,)).think_start_id == 7
    with pytest.raises(ValueError):
        _ = BuggyWrapper((1, 2)).think_start_id
    assert install_upstream_defensive_patches(force=True, patches=["fake_1128"])["fake_1128"].reason == \
        "already installed"
    assert uninstall_upstream_defensive_patches(patches=["fake_1128"]) == {"fake_1128": "removed"}
    with pytest.raises(TypeError):
        _ = BuggyWrapper(None).think_start_id


class Target:
    def method(self) -> str:
        return "original"


def _marked(owner: type, attr: str, original: Any) -> Any:
    def method(self: Any) -> str:
        return "patched"

    setattr(method, patches.MARKER, attr)
    return method


@pytest.mark.parametrize("wrap_first", [True, False])
def test_patch_splices_under_a_wrapt_wrapper(fake_patches: Any, wrap_first: bool) -> None:
    import wrapt

    class Local(Target):
        def method(self) -> str:
            return "original"

    calls: list[str] = []

    def spy(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        calls.append("spy")
        return wrapped(*args, **kwargs)

    fake_patches(patches.Patch("fake_splice", "mlx-lm", "none", "test", lambda: [(Local, "method")],
                               lambda o, a, orig: True, _marked))
    if wrap_first:
        wrapt.wrap_function_wrapper(Local, "method", spy)
    assert install_upstream_defensive_patches(force=True, patches=["fake_splice"])["fake_splice"] == "applied"
    if not wrap_first:
        wrapt.wrap_function_wrapper(Local, "method", spy)
    assert Local().method() == "patched" and calls == ["spy"]
    assert defensive_patch_status()["fake_splice"] is True
    assert uninstall_upstream_defensive_patches(patches=["fake_splice"]) == {"fake_splice": "removed"}
    assert Local().method() == "original" and calls == ["spy", "spy"]  # the wrapper survives
    assert isinstance(Local.__dict__["method"], wrapt.FunctionWrapper)


def test_failures_are_reported_and_leave_nothing_half_patched(fake_patches: Any,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    class Two:
        def a(self) -> str:
            return "a"

        def b(self) -> str:
            return "b"

    def build(owner: type, attr: str, original: Any) -> Any:
        if attr == "b":
            raise RuntimeError("cannot build")
        return _marked(owner, attr, original)

    fake_patches(patches.Patch("fake_fail", "mlx-lm", "none", "test", lambda: [(Two, "a"), (Two, "b")],
                               lambda o, a, orig: True, build))
    with caplog.at_level(logging.WARNING, logger="metal_guard.knowledge.patches"):
        state = install_upstream_defensive_patches(force=True, patches=["fake_fail"])["fake_fail"]
    assert state == "failed" and "cannot build" in state.reason
    assert Two().a() == "a"  # rolled back


def test_missing_package_is_unavailable(fake_patches: Any) -> None:
    fake_patches(patches.Patch("fake_missing", "no-such-package-xyz", "none", "test", lambda: [],
                               lambda o, a, orig: True, _marked))
    state = install_upstream_defensive_patches(patches=["fake_missing"])["fake_missing"]
    assert state == "unavailable" and "not installed" in state.reason


def test_uninstall_when_nothing_is_installed() -> None:
    assert set(uninstall_upstream_defensive_patches().values()) <= {"not-installed", "removed"}


def test_only_imported_never_imports_targets() -> None:
    pytest.importorskip("langchain_community")
    code = ("import sys, json; from metal_guard.knowledge.patches import install_upstream_defensive_patches as i; "
            "r = i(only_imported=True); "
            "print(json.dumps({k: [str(v), v.reason] for k, v in r.items()}), "
            "'langchain_community' in sys.modules, 'mlx_lm' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    line = proc.stdout.strip().splitlines()[-1]
    states, lc_loaded, mlx_lm_loaded = line.rsplit(" ", 2)
    assert (lc_loaded, mlx_lm_loaded) == ("False", "False"), proc.stderr
    result = json.loads(states)
    assert result["langchain_mlx_pipeline"][0] == "unavailable"
    assert "not imported yet" in result["langchain_mlx_pipeline"][1]
    assert result["mlx_lm_1128_think_start_id"][0] in ("unavailable", "not-needed")
