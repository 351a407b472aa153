"""Keep-alive and idle unload on the guarded ``mlx_lm.server`` (issue 12, new capability).

Real in-process server, tiny model, CPU MLX. The memory-pressure reading is the one thing this
machine cannot produce on demand: it comes from a fake macOS ``sysctl`` through the readers'
injectable runner (``tests/macos_fakes.py``).
"""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mlx_lm.server")
openai = pytest.importorskip("openai")

from macos_fakes import FakeMac, fixture  # noqa: E402
from server_support import Server, metric, wait_for  # noqa: E402

from metal_guard import installer as mg  # noqa: E402
from metal_guard.adapters._server_keepalive import parse_request_keep_alive  # noqa: E402
from metal_guard.breadcrumbs import read_lines  # noqa: E402
from metal_guard.errors import SettingsError  # noqa: E402
from metal_guard.settings import duration_seconds, get_settings  # noqa: E402


@pytest.fixture
def guarded(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Server]]:
    """Start servers with metal-guard installed; reloads are allowed at once (cadence 0)."""
    monkeypatch.setenv("METALGUARD_CADENCE_MIN_INTERVAL_SEC", "0")
    servers: list[Server] = []

    def start(model: Path, **env: str) -> Server:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        mg.install()
        srv = Server(model)
        servers.append(srv)
        wait_for(lambda: srv.state().phase == "ready", what="ready")
        return srv

    try:
        yield start
    finally:
        for srv in servers:
            srv.close()
        mg.uninstall()


def _unloads(srv: Server) -> int:
    return srv.state().counters["idle_unloads"]


def _crumbs(kind: str) -> list[str]:
    return [line for line in read_lines(200) if kind in line]


def test_idle_model_is_unloaded_after_the_keep_alive_and_reloaded_on_demand(
        guarded: Callable[..., Server], tiny_model_path: Path) -> None:
    srv = guarded(tiny_model_path, METALGUARD_SERVER_KEEP_ALIVE="2s")
    client = srv.openai()
    assert client.completions.create(model=str(tiny_model_path), prompt="hello", max_tokens=3).choices
    model = weakref.ref(srv.provider.model)
    loaded = srv.status()["server"]
    assert loaded["model_loaded"] is True and loaded["keep_alive_sec"] == 2.0
    active_loaded = loaded["memory"]["active_bytes"]

    wait_for(lambda: _unloads(srv) == 1, timeout=60, what="the keep-alive unload")
    gc.collect()
    assert srv.provider.model is None and model() is None  # really released, not just unreferenced
    unloaded = srv.status()["server"]
    assert unloaded["model_loaded"] is False and unloaded["ready"] is True
    assert unloaded["idle_unloads"] == 1
    freed = active_loaded - unloaded["memory"]["active_bytes"]
    assert freed > 0  # MLX's counters dropped
    # ... and the freed weights were handed back, not parked in MLX's buffer cache (the flush
    # runs after the generation loop dropped its own reference to the model)
    assert unloaded["memory"]["cache_bytes"] < freed
    assert len(srv.generator.prompt_cache) == 0
    text = srv.metrics()
    assert metric(text, "metal_guard_server_model_loaded") == 0
    assert metric(text, "metal_guard_server_idle_unloads_total") == 1
    assert metric(text, "metal_guard_server_ready") == 1
    crumb = _crumbs("SERVER_IDLE_UNLOAD")[-1]
    assert "reason=keep_alive" in crumb
    idle = float(crumb.split("idle_sec=")[1].split()[0])
    assert idle >= 2.0  # not a moment before the keep-alive

    # the next request loads it again through the guarded load and is answered normally
    answer = client.completions.create(model=str(tiny_model_path), prompt="again", max_tokens=3)
    assert answer.choices[0].text is not None
    assert srv.provider.model is not None and srv.state().counters["model_loads_total"] == 2
    assert srv.status()["server"]["model_loaded"] is True


def test_request_keep_alive_zero_unloads_right_after_the_request(
        guarded: Callable[..., Server], tiny_model_path: Path) -> None:
    srv = guarded(tiny_model_path)  # default: never unload
    client = srv.openai()
    client.completions.create(model=str(tiny_model_path), prompt="hello", max_tokens=2,
                              extra_body={"keep_alive": "5m"})
    assert srv.status()["server"]["keep_alive_sec"] == 300.0
    assert srv.provider.model is not None

    # a streamed request with keep_alive 0 (through the openai client): unloaded right after it
    stream = client.completions.create(model=str(tiny_model_path), prompt="stream", max_tokens=2,
                                       stream=True, extra_body={"keep_alive": 0})
    assert [chunk for chunk in stream]
    wait_for(lambda: _unloads(srv) == 1, what="the keep_alive=0 unload")
    assert srv.provider.model is None
    status, body = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
    assert srv.provider.model is not None  # the default (never) applies to this request


def test_invalid_keep_alive_is_a_400_with_an_openai_error(guarded: Callable[..., Server],
                                                         tiny_model_path: Path) -> None:
    srv = guarded(tiny_model_path)
    before = srv.state().counters["requests_total"]
    for bad in ("soon", True, [1], "5 minutes", "1e99h"):
        status, _h, raw = srv.request("/v1/completions", {"prompt": "x", "max_tokens": 2,
                                                          "keep_alive": bad})
        error = json.loads(raw)["error"]
        assert status == 400 and error["param"] == "keep_alive", bad
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_value"
    assert srv.state().counters["requests_total"] == before  # refused before any generation
    client = srv.openai()
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=str(tiny_model_path), prompt="x", max_tokens=2,
                                  extra_body={"keep_alive": "soon"})
    assert err.value.param == "keep_alive"
    assert srv.complete()[0] == 200


def test_idle_model_is_unloaded_early_under_memory_pressure(
        guarded: Callable[..., Server], tiny_model_path: Path) -> None:
    srv = guarded(tiny_model_path, METALGUARD_SERVER_UNLOAD_ON_PRESSURE="1")
    state = srv.state()
    state.pressure_runner = FakeMac()  # normal pressure
    assert srv.complete()[0] == 200
    checked = state.next_pressure_check
    wait_for(lambda: state.next_pressure_check > checked, what="a pressure check")
    assert srv.provider.model is not None  # normal pressure: kept

    state.pressure_runner = FakeMac(
        kern__memorystatus_vm_pressure_level=fixture("sysctl_pressure_level_critical.txt"))
    wait_for(lambda: _unloads(srv) == 1, what="the pressure unload")
    assert srv.provider.model is None
    assert "reason=memory_pressure" in _crumbs("SERVER_IDLE_UNLOAD")[-1]
    assert srv.status()["server"]["unload_on_pressure"] is True
    assert srv.complete()[0] == 200  # loaded again on demand


@pytest.mark.parametrize(("value", "seconds"), [
    (0, 0.0), (30, 30.0), (2.5, 2.5), (-1, -1.0), (-300, -1.0), ("30s", 30.0), ("5m", 300.0),
    ("1h", 3600.0), ("1h30m", 5400.0), ("250ms", 0.25), ("-1", -1.0), ("-5m", -1.0), ("0", 0.0),
    ("45", 45.0),
])
def test_request_keep_alive_follows_ollama(value: Any, seconds: float) -> None:
    assert parse_request_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["", "5 m", "m", "1x", "nan", "inf", "1e99h", None, True, {}, "5m\x00",
                                   "1" * 100])
def test_request_keep_alive_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_request_keep_alive(value)


def test_keep_alive_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_settings().server_keep_alive_sec == -1.0  # default: never (today's behaviour)
    for raw, expected in (("2s", 2.0), ("5m", 300.0), ("0", 0.0), ("-1", -1.0), ("-10m", -1.0)):
        monkeypatch.setenv("METALGUARD_SERVER_KEEP_ALIVE", raw)
        assert get_settings().server_keep_alive_sec == expected
    monkeypatch.setenv("METALGUARD_SERVER_KEEP_ALIVE", "a while")
    with pytest.raises(SettingsError, match="METALGUARD_SERVER_KEEP_ALIVE"):
        get_settings()
    assert duration_seconds("1.5h") == 5400.0


def test_nothing_is_unloaded_while_a_request_is_in_flight(guarded: Callable[..., Server],
                                                          tiny_model_path: Path) -> None:
    """The expiry decision itself, on a live server's state: an HTTP handler still answering,
    a request the generation thread holds, or one waiting in the queue all block the unload."""
    import queue
    from types import SimpleNamespace

    from metal_guard.adapters import _server_keepalive as keepalive
    from metal_guard.adapters._server_state import TrackedQueue

    class Inbox:
        def put(self, item: Any) -> None:
            pass

    srv = guarded(tiny_model_path)
    state = srv.state()
    with state.lock:  # a handler is busy; the last finished request asked for keep_alive 0
        state.active_handlers += 1
        state.request_keep_alive = 0.0
    polls = state.idle_polls
    held = TrackedQueue(Inbox())
    try:
        wait_for(lambda: state.idle_polls >= polls + 5, what="idle polls")
        assert srv.provider.model is not None and _unloads(srv) == 0
        assert keepalive.due(state, srv.generator, srv.provider) is None
        state.track(held)  # (before the handler count drops: the real loop never sees it idle)
    finally:
        with state.lock:
            state.active_handlers -= 1

    polls = state.idle_polls
    wait_for(lambda: state.idle_polls >= polls + 5, what="idle polls")
    assert srv.provider.model is not None and _unloads(srv) == 0  # the generation thread holds one
    assert keepalive.due(state, srv.generator, srv.provider) is None
    # From here the real loop may unload the real model at any moment: decide for a stand-in.
    loaded = SimpleNamespace(model=object())
    held.put(None)  # its answer is complete
    waiting: queue.Queue[Any] = queue.Queue()
    waiting.put("a request not taken yet")  # (a stand-in queue: the real loop would take it)
    assert keepalive.due(state, SimpleNamespace(requests=waiting), loaded) is None
    assert keepalive.due(state, SimpleNamespace(requests=queue.Queue()), loaded) == "keep_alive"
