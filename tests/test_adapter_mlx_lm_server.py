"""The mlx_lm.server adapter on a real in-process ``mlx_lm.server`` (tiny model, CPU MLX).

The server is the library's own ``ModelProvider`` / ``ResponseGenerator`` / ``APIHandler`` on a
``ThreadingHTTPServer`` bound to 127.0.0.1 — only the argparse step of ``main()`` is skipped.
OOMs are real exceptions raised from inside the generation step by the adapter's test-only
fault (``METALGUARD_TEST_SERVER_OOM_EVERY``), carrying MLX's exact Metal OOM text.
``tests/e2e/test_server.py`` runs the real ``python -m mlx_lm server`` under ``metal-guard run``;
``tests/test_server_*.py`` cover readiness, switches, keep-alive, errors and the batched path.
"""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

server = pytest.importorskip("mlx_lm.server")

from server_support import Server, wait_for  # noqa: E402

from metal_guard import installer as mg  # noqa: E402
from metal_guard.adapters import _server_http as http  # noqa: E402


def _wait_at_rest(srv: Server) -> None:
    """mlx_lm.server saves a request's prompt-cache entry just *after* its last item, so its
    client may read the cache first. Wait until the generation thread found no work once more:
    that poll began after the whole request (the save included) was done."""
    polls = srv.state().idle_polls
    wait_for(lambda: srv.state().idle_polls > polls, timeout=60, what="the generation loop to idle")


@pytest.fixture
def installed() -> Iterator[None]:
    mg.install()
    try:
        yield
    finally:
        mg.uninstall()


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Path:
    from metal_guard.tinymodel import ensure_tiny_lm

    return ensure_tiny_lm(tmp_path_factory.mktemp("second") / "tiny-lm-b", seed=1)


def test_sites_patched() -> None:
    report = mg.install(adapters=["mlx_lm", "mlx_lm_server"])
    try:
        row = report["adapters"]["mlx_lm_server"]
        assert row["state"] == "patched", row
        assert "mlx_lm.server:ModelProvider._load" in row["sites"]
        assert "mlx_lm.server:APIHandler.do_GET" in row["sites"]
    finally:
        mg.uninstall()


def test_completions_chat_and_status_routes(installed: None, start_server: Callable[..., Server],
                                            tiny_model_path: Path) -> None:
    srv = start_server(tiny_model_path)
    status, body = srv.complete()
    assert status == 200 and body["choices"][0]["text"]
    status, body = srv.post("/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"

    status, _h, raw = srv.request("/metal-guard/status")
    assert status == 200
    snap = json.loads(raw)
    import jsonschema

    from metal_guard.status import status_schema

    jsonschema.validate(snap, status_schema())
    assert snap["server"]["generation_alive"] is True
    assert snap["server"]["model"] == str(tiny_model_path)
    assert snap["server"]["requests_total"] == 2
    assert snap["server"]["model_loads_total"] == 1
    assert snap["adapters"]["mlx_lm_server"] == "patched"

    status, headers, raw = srv.request("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = raw.decode()
    assert "metal_guard_server_requests_total 2" in text
    assert "metal_guard_server_generation_up 1" in text
    # upstream routes still work, unknown ones still 404
    assert srv.request("/health")[0] == 200
    assert srv.request("/nope")[0] == 404


def test_oom_in_batched_loop_answers_503_and_keeps_serving(
        monkeypatch: pytest.MonkeyPatch, start_server: Callable[..., Server], tiny_model_path: Path) -> None:
    monkeypatch.setenv("METALGUARD_TEST_SERVER_OOM_EVERY", "2")
    mg.install()
    try:
        srv = start_server(tiny_model_path)
        assert srv.complete()[0] == 200
        status, headers, raw = srv.request("/v1/completions", {"prompt": "again", "max_tokens": 4})
        assert status == 503
        error = json.loads(raw)["error"]
        assert error["code"] == "metal_oom" and "Insufficient Memory" in error["message"]
        assert error["type"] == "service_unavailable_error" and error["param"] is None
        assert headers["Retry-After"] == "1"
        # the generation thread survived: the next requests succeed
        assert srv.complete()[0] == 200
        assert srv.request("/health")[0] == 200
        counters = srv.state().counters
        assert counters["oom_recoveries_total"] == 1 and counters["responses_503_total"] == 1
        assert srv.generator.generation_available()
    finally:
        mg.uninstall()


def test_oom_on_sequential_path_answers_503_and_drops_prompt_cache(
        monkeypatch: pytest.MonkeyPatch, start_server: Callable[..., Server], tiny_model_path: Path) -> None:
    monkeypatch.setenv("METALGUARD_TEST_SERVER_OOM_EVERY", "2")
    mg.install()
    try:
        srv = start_server(tiny_model_path)
        # a seed makes mlx_lm.server serve the request sequentially (stream_generate)
        assert srv.complete(seed=1)[0] == 200
        _wait_at_rest(srv)
        assert len(srv.generator.prompt_cache) == 1
        status, body = srv.complete("other prompt", seed=1)
        assert status == 503 and body["error"]["code"] == "metal_oom"
        assert len(srv.generator.prompt_cache) == 0  # released before the 503 was sent
        assert srv.state().counters["oom_recoveries_total"] == 0  # the loop never died
        assert srv.state().last_oom is not None and srv.state().last_oom["where"] == "sequential"
        assert srv.complete(seed=1)[0] == 200
    finally:
        mg.uninstall()


def test_oom_mid_stream_ends_the_stream_with_an_error_event(
        monkeypatch: pytest.MonkeyPatch, start_server: Callable[..., Server], tiny_model_path: Path) -> None:
    monkeypatch.setenv("METALGUARD_TEST_SERVER_OOM_EVERY", "1")
    mg.install()
    try:
        srv = start_server(tiny_model_path)
        status, _headers, raw = srv.request("/v1/completions",
                                            {"prompt": "stream me", "max_tokens": 4, "stream": True})
        assert status == 200  # the SSE headers were on the wire before the OOM
        events = [line[len("data: "):] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["error"]["code"] == "metal_oom"
        counters = srv.state().counters
        assert counters["stream_errors_total"] == 1 and counters["responses_503_total"] == 0
    finally:
        mg.uninstall()
    # uninstalled: the fault is gone and the same server answers normally
    assert srv.complete()[0] == 200


def test_model_switch_releases_previous_model_and_enforces_cadence(
        monkeypatch: pytest.MonkeyPatch, installed: None, start_server: Callable[..., Server],
        tiny_model_path: Path, second_model: Path) -> None:
    # tiny models never wait under the risk-scaled rule: ask for the seed's fixed 180 s
    monkeypatch.setenv("METALGUARD_CADENCE_MIN_INTERVAL_SEC", "180")
    srv = start_server(tiny_model_path)
    assert srv.complete()[0] == 200
    first = weakref.ref(srv.provider.model)
    _wait_at_rest(srv)
    assert len(srv.generator.prompt_cache) == 1

    status, _body = srv.complete(model=str(second_model))
    assert status == 200
    gc.collect()
    assert first() is None  # the previous model was released
    assert srv.provider.model_key[0] == str(second_model)
    # the first model's prompt-cache entry was dropped with it
    _wait_at_rest(srv)
    assert len(srv.generator.prompt_cache) == 1

    # switching back within the cadence interval (180 s) is refused; the current model serves on
    status, headers, raw = srv.request("/v1/completions",
                                       {"prompt": "x", "max_tokens": 2, "model": str(tiny_model_path)})
    assert status == 503
    error = json.loads(raw)["error"]
    assert error["code"] == "model_switch_cadence" and error["param"] == "model"
    assert int(headers["Retry-After"]) > 100
    assert srv.provider.model_key[0] == str(second_model)
    assert srv.complete(model=str(second_model))[0] == 200
    counters = srv.state().counters
    assert counters["model_loads_total"] == 2 and counters["model_switch_refused_total"] == 1

    from metal_guard.policy import model_id_of

    assert model_id_of(srv.provider.model) == str(second_model)


@pytest.mark.parametrize("cap", [None, 150_000])
def test_prompt_cache_byte_cap_on_sequential_path(monkeypatch: pytest.MonkeyPatch, cap: int | None,
                                                  start_server: Callable[..., Server],
                                                  tiny_model_path: Path) -> None:
    if cap is not None:
        monkeypatch.setenv("METALGUARD_PROMPT_CACHE_MAX_BYTES", str(cap))
    mg.install()
    try:
        srv = start_server(tiny_model_path)
        for prompt in ("alpha beta", "gamma delta", "epsilon zeta"):
            assert srv.complete(prompt, seed=3)[0] == 200  # seeded: the sequential path
        _wait_at_rest(srv)
        cache = srv.generator.prompt_cache
        if cap is None:
            assert len(cache) == 3  # mlx_lm.server bounds only the entry count here
        else:
            assert cache.nbytes <= cap and len(cache) == 1
            _status, _h, raw = srv.request("/metal-guard/status")
            assert json.loads(raw)["server"]["prompt_cache_max_bytes"] == cap
    finally:
        mg.uninstall()


def test_uninstall_removes_the_routes(start_server: Callable[..., Server], tiny_model_path: Path) -> None:
    mg.install()
    srv = start_server(tiny_model_path)
    assert srv.request("/metal-guard/status")[0] == 200
    mg.uninstall()
    assert srv.request("/metal-guard/status")[0] == 404
    assert srv.complete()[0] == 200


def test_unavailable_classification() -> None:
    from metal_guard.errors import CadenceViolation, MetalOOMError, ModelDoesNotFitError

    assert http.unavailable(RuntimeError("[malloc] Unable to allocate 1024 bytes.")) == ("metal_oom", 1)
    # a resource-limit (descriptor leak) error is not an OOM: not turned into a 503
    assert http.unavailable(RuntimeError("[metal::malloc] Resource limit (499000) exceeded.")) is None
    assert http.unavailable(MetalOOMError("x")) == ("metal_oom", 1)
    kind, retry = http.unavailable(CadenceViolation("m", last_ts=0.0, min_interval=180.0, delta=10.0))
    assert kind == "model_switch_cadence" and retry == 170
    assert http.unavailable(ModelDoesNotFitError("too big")) == ("model_does_not_fit", None)
    assert http.unavailable(RuntimeError("generation thread died"))[0] == "generation_unavailable"  # type: ignore[index]
    assert http.unavailable(ValueError("bad request")) is None


def test_oom_restart_keeps_the_model_being_served(
        monkeypatch: pytest.MonkeyPatch, start_server: Callable[..., Server], tiny_model_path: Path,
        second_model: Path) -> None:
    """The restarted loop does not reload the start-up model over the one being served (that
    reload met the cadence and killed the generation thread)."""
    from metal_guard.policy import refresh_settings

    mg.install()
    try:
        srv = start_server(tiny_model_path)
        assert srv.complete()[0] == 200
        assert srv.complete(model=str(second_model))[0] == 200
        monkeypatch.setenv("METALGUARD_TEST_SERVER_OOM_EVERY", "1")
        refresh_settings()
        status, body = srv.complete(model=str(second_model))
        assert status == 503 and body["error"]["code"] == "metal_oom"
        monkeypatch.delenv("METALGUARD_TEST_SERVER_OOM_EVERY")
        refresh_settings()
        assert srv.complete(model=str(second_model))[0] == 200
        assert srv.generator.generation_available()
        assert srv.provider.model_key[0] == str(second_model)
        counters = srv.state().counters
        assert counters["oom_recoveries_total"] == 1 and counters["model_loads_total"] == 2
    finally:
        mg.uninstall()
