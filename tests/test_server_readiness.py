"""Defects 2-4 of issue 12: honest readiness, no live zombie, health that includes the server.

Defect 2/4 on a real in-process ``mlx_lm.server``; defect 3 on the real process started the way
the shipped launchd plist starts it (``/bin/sh`` gate wrapper → ``metal-guard run`` →
``mlx_lm.server``), because the point is the process's exit code.
"""

from __future__ import annotations

import json
import os
import plistlib
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mlx_lm.server")
openai = pytest.importorskip("openai")

from server_support import Server, metric, queued_request, wait_for  # noqa: E402
from support import free_port  # noqa: E402

from metal_guard import installer as mg  # noqa: E402
from metal_guard.adapters import _server_http as http  # noqa: E402
from metal_guard.adapters.mlx_lm_server import EXIT_SERVER_GAVE_UP, MAX_RECOVERIES  # noqa: E402
from metal_guard.cadence import CadenceGuard  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_restart_within_the_cadence_is_not_ready_and_answers_503_at_once(
        monkeypatch: pytest.MonkeyPatch, start_server: Callable[..., Server], tiny_model_path: Path) -> None:
    monkeypatch.setenv("METALGUARD_CADENCE_MIN_INTERVAL_SEC", "8")
    CadenceGuard().mark_load(str(tiny_model_path))  # "the server crashed and was restarted at once"
    mg.install()
    try:
        srv = start_server(tiny_model_path)
        wait_for(lambda: srv.state().phase == "waiting", what="the start-up wait")

        # A client that passed the door while the server was still "starting", a moment before
        # the wait began: its request is already in the queue. It is answered 503 during the
        # wait too, not served (or left hanging) when the wait is over.
        answered = queued_request(srv, tiny_model_path)
        assert answered.wait(30), "a request queued before the wait got no answer during it"
        assert srv.state().phase == "waiting"
        assert isinstance(answered.result, http.NotReady), answered.result
        assert answered.result.reason == "model_load_cadence" and answered.result.retry_after

        status, headers, raw = srv.request("/health")
        body = json.loads(raw)
        assert status == 503 and body["status"] == "unavailable"
        assert body["reason"] == "model_load_cadence" and 1 <= int(headers["Retry-After"]) <= 8
        assert body["error"]["code"] == "model_load_cadence"

        client = srv.openai()
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model=str(tiny_model_path), prompt="hi", max_tokens=2)
        # answered while the server was still waiting: the request did not hang until the load
        assert srv.state().phase == "waiting" and srv.provider.model is None
        assert err.value.status_code == 503 and err.value.code == "model_load_cadence"
        assert err.value.type == "service_unavailable_error"
        assert int(err.value.response.headers["Retry-After"]) >= 1

        snap = srv.status()
        assert snap["server"]["ready"] is False and snap["server"]["phase"] == "waiting"
        assert snap["server"]["not_ready_reason"] == "model_load_cadence"
        assert snap["health"] == {"exit_code": 1, "label": "SERVER NOT READY (model_load_cadence)"}
        text = srv.metrics()
        assert metric(text, "metal_guard_server_ready") == 0
        assert metric(text, "metal_guard_health_exit_code") == 1
        assert metric(text, "metal_guard_server_cadence_waits_total") == 1

        # the wait ends by itself; then it is ready, healthy and serving
        wait_for(lambda: srv.request("/health")[0] == 200, what="/health 200")
        answer = client.completions.create(model=str(tiny_model_path), prompt="hi", max_tokens=2)
        assert answer.choices[0].text is not None
        snap = srv.status()
        assert snap["server"]["ready"] is True and snap["health"]["exit_code"] == 0
        assert metric(srv.metrics(), "metal_guard_server_ready") == 1
    finally:
        mg.uninstall()


def test_status_health_includes_a_dead_generation_thread(start_server: Callable[..., Server],
                                                         tiny_model_path: Path) -> None:
    """Defect 4: a server that cannot serve is never ``exit_code 0, "OK"``."""
    mg.install()
    try:
        srv = start_server(tiny_model_path / "does-not-exist")  # start-up load fails
        wait_for(lambda: not srv.generator.generation_available(), what="the thread to stop")
        snap = srv.status()
        assert snap["server"]["ready"] is False and snap["server"]["phase"] == "gave_up"
        assert snap["health"]["exit_code"] == 1 and snap["health"]["label"].startswith("SERVER NOT READY")
        text = srv.metrics()
        assert metric(text, "metal_guard_health_exit_code") == 1
        assert metric(text, "metal_guard_server_generation_up") == 0
        status, _headers, raw = srv.request("/health")
        assert status == 503 and json.loads(raw)["reason"] == "generation_unavailable"
        status, _h, raw = srv.request("/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 503 and json.loads(raw)["error"]["code"] == "generation_unavailable"
        # an embedded server (not started through mlx_lm.server.run) never exits the process
        assert srv.state().owns_process is False
    finally:
        mg.uninstall()


# --------------------------------------------------------------------------- defect 3


def _plist_program(model: Path, port: int) -> tuple[list[str], dict[str, Any]]:
    """The shipped plist's ProgramArguments with this machine's interpreter and the tiny model."""
    plist = plistlib.loads((EXAMPLES / "launchd" / "com.example.mlx-server.plist").read_bytes())
    bindir = Path(sys.executable).parent
    subst = {"/opt/homebrew/bin/python3": sys.executable,
             "/opt/homebrew/bin/mlx_lm.server": str(bindir / "mlx_lm.server"),
             "mlx-community/Qwen3-4B-4bit": str(model), "8080": str(port)}
    return [subst.get(a, a) for a in plist["ProgramArguments"]], plist


def _post(port: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _ready(port: int, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"server exited early with {proc.returncode}")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_a_server_that_gave_up_exits_nonzero_and_launchd_restarts_it(tiny_model_path: Path,
                                                                     tmp_path: Path) -> None:
    port = free_port()
    cmd, plist = _plist_program(tiny_model_path, port)
    # launchd restarts the job when it exits non-zero
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    env = dict(os.environ, METALGUARD_TESTING="1", METALGUARD_TEST_SERVER_OOM_EVERY="1")
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(lambda: _ready(port, proc), timeout=120, interval=0.2, what="the server")
            answers = [_post(port, {"prompt": "x", "max_tokens": 2}) for _ in range(MAX_RECOVERIES + 1)]
            # every request, the last one included, got its answer before the process went
            assert [status for status, _ in answers] == [503] * (MAX_RECOVERIES + 1)
            assert all(body["error"]["code"] == "metal_oom" for _, body in answers)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=20)
    output = log_path.read_text(errors="replace")
    assert code == EXIT_SERVER_GAVE_UP, output[-3000:]
    assert f"exits with code {EXIT_SERVER_GAVE_UP}" in output


def test_exit_code_is_in_the_cli_table() -> None:
    from metal_guard.cli import EXIT_CODES
    from metal_guard.cli import EXIT_SERVER_GAVE_UP as CLI_CODE

    assert CLI_CODE == EXIT_SERVER_GAVE_UP and "gave up" in EXIT_CODES[CLI_CODE]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"| {EXIT_SERVER_GAVE_UP} |" in readme
