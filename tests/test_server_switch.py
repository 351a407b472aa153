"""Defect 1 of issue 12: a request for a model the server cannot load never costs it the model
it serves, and a failed load is never a load for the cadence.

Real in-process ``mlx_lm.server`` (tiny model, CPU MLX), the official ``openai`` client.
"""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("mlx_lm.server")
openai = pytest.importorskip("openai")

from server_support import Server  # noqa: E402

from metal_guard import installer as mg  # noqa: E402
from metal_guard.cadence import CadenceGuard  # noqa: E402


@pytest.fixture
def srv(shared_server: Server) -> Iterator[Server]:
    mg.install()
    try:
        yield shared_server
    finally:
        mg.uninstall()


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Path:
    """Resolvable (config readable, a weights file present) but not loadable: corrupt weights."""
    path = tmp_path_factory.mktemp("broken") / "tiny-broken"
    shutil.copytree(tiny_model_path, path)
    for weights in path.glob("*.safetensors"):
        weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    return path


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404_and_the_served_model_keeps_serving(srv: Server, tiny_model_path: Path,
                                                                  stream: bool) -> None:
    client = srv.openai()
    first = client.completions.create(model=str(tiny_model_path), prompt="hello", max_tokens=3)
    assert first.choices[0].text is not None
    model = weakref.ref(srv.provider.model)
    loads = srv.state().counters["model_loads_total"]

    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4o-mini", prompt="hello", max_tokens=3, stream=stream)
    assert err.value.status_code == 404
    assert err.value.code == "model_not_found" and err.value.type == "invalid_request_error"
    assert err.value.param == "model" and "gpt-4o-mini" in str(err.value)

    # the plain server answered 404 too, but had already dropped its model; this one has not
    assert srv.provider.model is not None and srv.provider.model is model()
    answer = client.completions.create(model=str(tiny_model_path), prompt="again", max_tokens=3)
    assert answer.choices[0].text is not None
    chat = client.chat.completions.create(model=str(tiny_model_path), max_tokens=3,
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.role == "assistant"
    state = srv.state()
    assert state.counters["model_loads_total"] == loads  # nothing was reloaded
    assert state.counters["model_not_found_total"] >= 1
    assert CadenceGuard().last_ts("gpt-4o-mini") is None  # never recorded as a load


def test_missing_local_directory_is_404(srv: Server, tmp_path: Path) -> None:
    status, headers, raw = srv.request("/v1/completions", {"prompt": "x", "max_tokens": 2,
                                                           "model": str(tmp_path / "nope")})
    assert status == 404 and headers["Content-Type"] == "application/json"
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["code"] == "model_not_found"
    assert srv.complete()[0] == 200


def test_switch_that_fails_after_the_release_brings_the_previous_model_back(
        srv: Server, tiny_model_path: Path, broken_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny models never wait under the risk-scaled rule; a fixed interval makes the hold visible.
    monkeypatch.setenv("METALGUARD_CADENCE_MIN_INTERVAL_SEC", "180")
    assert srv.complete(model=str(tiny_model_path))[0] == 200
    before = srv.state().counters.copy()

    status, _body = srv.complete(model=str(broken_model))
    assert status != 200  # mlx-lm's own load error (answered by mlx_lm.server as before)
    assert srv.provider.model is not None
    assert srv.provider.model_key[0] == str(tiny_model_path)  # the previous model is back
    assert srv.complete(model=str(tiny_model_path))[0] == 200

    # retried at once: refused without touching the served model, 503 + Retry-After
    loads = srv.state().counters["model_loads_total"]
    status, headers, raw = srv.request("/v1/completions", {"prompt": "x", "max_tokens": 2,
                                                           "model": str(broken_model)})
    assert status == 503 and json.loads(raw)["error"]["code"] == "model_switch_failed"
    assert int(headers["Retry-After"]) >= 1
    assert srv.state().counters["model_loads_total"] == loads
    after = srv.state().counters
    assert after["model_switch_failed_total"] == before["model_switch_failed_total"] + 1
    assert CadenceGuard().last_ts(str(broken_model)) is None  # the failed load left no record
    # the restore reload is recorded (it is a real load)
    assert CadenceGuard().last_ts(str(tiny_model_path)) is not None


def test_a_failed_load_rolls_back_its_cadence_record(tiny_model_path: Path, tmp_path: Path) -> None:
    """At the policy level, for every adapter: the record a failed load made is taken back and
    the one it replaced is restored."""
    import mlx_lm

    guard = CadenceGuard()
    guard.mark_load(str(tiny_model_path), ts=1000.0)  # long ago
    missing = tmp_path / "not-a-model"
    missing.mkdir()
    mg.install(adapters=["mlx_lm"])
    try:
        with pytest.raises(FileNotFoundError):
            mlx_lm.load(str(missing))
        assert guard.last_ts(str(missing)) is None
        copy = tmp_path / "copy"
        shutil.copytree(tiny_model_path, copy)
        (copy / "model.safetensors").write_bytes(b"garbage")
        guard.mark_load(str(copy), ts=2000.0)
        with pytest.raises(RuntimeError):  # mlx's safetensors reader on corrupt weights
            mlx_lm.load(str(copy))
        assert guard.last_ts(str(copy)) == 2000.0  # the earlier record is back
        mlx_lm.load(str(tiny_model_path))
        assert (guard.last_ts(str(tiny_model_path)) or 0) > 1000.0  # a success is recorded
    finally:
        mg.uninstall()
    gc.collect()
