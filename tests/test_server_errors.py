"""OpenAI-shaped errors and metrics that mean what they say (issue 12, interface fixes).

The official ``openai`` client against a real in-process ``mlx_lm.server``; OOMs from the
adapter's test fault (MLX's exact Metal OOM text raised inside the generation step).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("mlx_lm.server")
openai = pytest.importorskip("openai")

from server_support import Server, metric  # noqa: E402

from metal_guard import installer as mg  # noqa: E402
from metal_guard.adapters import _openai_errors as oai  # noqa: E402
from metal_guard.breadcrumbs import read_lines  # noqa: E402


@pytest.fixture
def oom_every_request(shared_server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv("METALGUARD_TEST_SERVER_OOM_EVERY", "1")
    mg.install()  # refreshes the hot-path settings: every request's sampler now fails
    try:
        yield shared_server
    finally:
        mg.uninstall()


def test_oom_before_the_first_byte_is_a_503_the_sdk_understands(oom_every_request: Server,
                                                                  tiny_model_path: Path) -> None:
    srv = oom_every_request
    before = srv.state().counters.copy()
    client = srv.openai()
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model=str(tiny_model_path), max_tokens=3,
                                       messages=[{"role": "user", "content": "hi"}])
    exc = err.value
    assert exc.status_code == 503 and exc.code == "metal_oom"
    assert exc.type == "service_unavailable_error" and exc.param is None
    assert "Insufficient Memory" in exc.message and exc.response.headers["Retry-After"] == "1"
    after = srv.state().counters
    assert after["responses_503_total"] == before["responses_503_total"] + 1
    assert after["stream_errors_total"] == before["stream_errors_total"]


def test_oom_mid_stream_is_an_error_event_the_sdk_raises(oom_every_request: Server,
                                                         tiny_model_path: Path) -> None:
    srv = oom_every_request
    before = srv.state().counters.copy()
    client = srv.openai()
    stream = client.completions.create(model=str(tiny_model_path), prompt="stream", max_tokens=4,
                                       stream=True)
    with pytest.raises(openai.APIError) as err:
        for _chunk in stream:
            pass
    exc = err.value
    assert not isinstance(exc, openai.APIStatusError)  # the 200 was already on the wire
    assert "Insufficient Memory" in exc.message and "error occurred during streaming" not in exc.message
    assert exc.code == "metal_oom" and exc.type == "service_unavailable_error"
    after = srv.state().counters
    # a stream error event is not an HTTP 503
    assert after["stream_errors_total"] == before["stream_errors_total"] + 1
    assert after["responses_503_total"] == before["responses_503_total"]
    text = srv.metrics()
    assert metric(text, "metal_guard_server_stream_errors_total") == after["stream_errors_total"]
    assert metric(text, "metal_guard_server_responses_503_total") == after["responses_503_total"]


def test_recovery_log_counts_the_requests_it_really_answered(shared_server: Server,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    mg.install()
    try:
        for _ in range(4):  # finished requests must not be counted as failed by the next OOM
            assert shared_server.complete("fine")[0] == 200
    finally:
        mg.uninstall()
    monkeypatch.setenv("METALGUARD_TEST_SERVER_OOM_EVERY", "1")
    mg.install()
    try:
        assert shared_server.complete("boom")[0] == 503
    finally:
        mg.uninstall()
    recovered = [line for line in read_lines(100) if "SERVER_OOM_RECOVERED" in line]
    assert recovered and "answered_503=1" in recovered[-1], recovered


def test_server_memory_series_have_stable_labels(shared_server: Server) -> None:
    mg.install()
    try:
        assert shared_server.complete()[0] == 200
        text = shared_server.metrics()
    finally:
        mg.uninstall()
    lines = text.splitlines()
    for name in ("active_bytes", "cache_bytes", "peak_bytes"):
        value = metric(text, f"metal_guard_server_memory_{name}")
        assert value is not None and value >= 0, name
    # no series of this process carries its pid or model path (they change on every restart)
    own = f'pid="{os.getpid()}"'
    assert not [line for line in lines if own in line]
    assert not [line for line in lines if line.startswith("metal_guard_server_") and "{" in line]
    for line in lines:  # well-formed exposition: every sample has a declared family
        if line and not line.startswith("#"):
            family = line.split("{")[0].split()[0]
            assert f"# TYPE {family} " in text, line


def test_openai_error_helpers_are_bounded_and_injection_free() -> None:
    body = oai.error_body("x" * 10_000, oai.UNAVAILABLE, "metal_oom")
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert len(body["error"]["message"]) == oai.MAX_MESSAGE_CHARS
    event = oai.sse_error_event("line one\n\ndata: [DONE]\n\n", oai.UNAVAILABLE, "c\nx", "p\r")
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    decoded = json.loads(event[len(b"data: "):])
    assert decoded["error"]["message"].startswith("line one\n") and decoded["error"]["code"] == "cx"
    assert decoded["error"]["param"] == "p"
    assert json.loads(oai.encode_error(None, "")) == {
        "error": {"message": "error", "type": "server_error", "code": None, "param": None}}
