"""``metal-guard serve`` end to end: a real front, the real ``mlx_lm.server`` child with the tiny
model, the official ``openai`` client, and real SIGKILL / SIGABRT / SIGSEGV sent to the child.

One front is shared by the module (each child load costs seconds); tests that need their own
settings (breaker, orphans) start their own.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import Front, pid_gone, serve_env
from support import wait_for

pytest.importorskip("mlx_lm.server")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.e2e

EXPECTED_CLASS = {signal.SIGKILL: "worker_killed", signal.SIGABRT: "process_abort",
                  signal.SIGSEGV: "worker_segfault"}
RESPAWN_TIMEOUT_SEC = 180.0


@pytest.fixture(scope="module")
def front(module_home: Path, tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Front]:
    log = tmp_path_factory.mktemp("serve") / "front.log"
    srv = Front(tiny_model_path, log, serve_env(module_home))
    try:
        srv.wait_ready()
        yield srv
    finally:
        pid = None
        try:
            pid = int(srv.status()["serve"]["active"]["pid"])
        except Exception:
            pass
        code = srv.stop()
        assert code == 0, srv.output()  # SIGTERM: clean stop, exit 0
        if pid is not None:
            assert pid_gone(pid), "the child outlived the front's clean stop"


def client(front: Front) -> Any:
    return openai.OpenAI(base_url=front.base + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(front: Front, **extra: Any) -> Any:
    return client(front).chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": "hello"}],
        max_tokens=4, temperature=0.0, **extra)


def until_200(front: Front) -> tuple[int, Any]:
    """Send requests until one succeeds; every failure must be a 503 (never a reset)."""
    seen_503 = 0
    deadline = time.monotonic() + RESPAWN_TIMEOUT_SEC
    while time.monotonic() < deadline:
        try:
            return seen_503, ask(front)
        except openai.APIStatusError as exc:
            assert exc.status_code == 503, exc
            body = exc.response.json()
            assert set(body["error"]) >= {"message", "type", "code", "param"}
            assert int(exc.response.headers["Retry-After"]) >= 1
            seen_503 += 1
            time.sleep(0.05)
    raise AssertionError(f"no 200 within {RESPAWN_TIMEOUT_SEC}s:\n{front.output()}")


def last_crash(front: Front) -> dict[str, Any]:
    return dict(front.status()["serve"]["last_crash"])


def test_front_answers_its_own_routes_and_never_imports_mlx(front: Front) -> None:
    code, _, body = front.get("/health")
    health = json.loads(body)
    assert code == 200 and health["status"] == "ready" and health["child_pid"]
    status = front.status()
    assert status["front"]["mlx_imported"] is False
    assert status["serve"]["child_up"] is True
    assert status["child"] is not None  # the child's own guarded status is embedded
    maps = Path(f"/proc/{front.proc.pid}/maps")
    if maps.exists():
        assert "libmlx" not in maps.read_text()
    code, _, text = front.get("/metrics")
    assert code == 200 and b"metalguard_serve_child_up 1" in text


def test_requests_and_streams_pass_through_unchanged(front: Front) -> None:
    import http.client

    child_port = int(front.status()["serve"]["active"]["port"])
    body = json.dumps({"prompt": "hello world", "max_tokens": 6, "temperature": 0.0})

    def post(port: int, payload: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", payload, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, data

    via, direct = post(front.port, body), post(child_port, body)
    assert via[0] == direct[0] == 200
    strip = ("id", "created", "usage")  # usage differs by the prompt cache
    assert ({k: v for k, v in json.loads(via[1]).items() if k not in strip}
            == {k: v for k, v in json.loads(direct[1]).items() if k not in strip})
    stream = client(front).chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
        temperature=0.0, stream=True)
    chunks = [c for c in stream]
    assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop")
    # an unknown route reaches the child (its 404), not the front
    code, _, _ = front.get("/no-such-route")
    assert code == 404


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGABRT, signal.SIGSEGV],
                         ids=lambda s: signal.Signals(s).name)
def test_crash_during_a_stream_then_503s_then_200(front: Front, sig: int) -> None:
    pid = front.child_pid()
    stream = client(front).chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": "tell me a story"}],
        max_tokens=100000, temperature=0.0, stream=True)
    it = iter(stream)
    next(it)  # the stream is running
    os.kill(pid, sig)
    with pytest.raises(openai.APIError) as info:  # a final error event, not a reset
        for _ in it:
            pass
    assert "crashed" in str(info.value) or "died" in str(info.value)
    seen_503, reply = until_200(front)
    assert seen_503 >= 1 and reply.choices[0].message.content is not None
    crash = last_crash(front)
    assert crash["pid"] == pid and crash["error_class"] == EXPECTED_CLASS[sig]
    assert front.child_pid() != pid and pid_gone(pid)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGABRT, signal.SIGSEGV],
                         ids=lambda s: signal.Signals(s).name)
def test_crash_between_requests_then_503s_then_200(front: Front, sig: int) -> None:
    pid = front.child_pid()
    assert ask(front).choices
    restarts = front.status()["serve"]["restarts"]
    os.kill(pid, sig)
    assert pid_gone(pid)
    seen_503, reply = until_200(front)
    assert seen_503 >= 1 and reply.choices
    status = front.status()["serve"]
    assert status["restarts"] == restarts + 1
    assert status["last_crash"]["error_class"] == EXPECTED_CLASS[sig]
    health = json.loads(front.get("/health")[2])
    assert health["status"] == "ready" and health["child_pid"] != pid


def test_health_and_metrics_answer_while_the_child_is_down(front: Front) -> None:
    pid = front.child_pid()
    os.kill(pid, signal.SIGKILL)
    assert pid_gone(pid)
    # The front notices the death within moments; the next child then needs seconds to load,
    # so the "down" answer is there to be seen (it was checked only if seen at the first look).
    _code, headers, body = wait_for(lambda: (r := front.get("/health"))[0] == 503 and r,
                                    interval=0.02, what="/health to answer 503 while down")
    health = json.loads(body)
    assert health["status"] == "starting" and "worker_killed" in health["reason"]
    assert int(headers["Retry-After"]) >= 1
    code, _, text = front.get("/metrics")
    assert code == 200 and b"metalguard_serve_child_up 0" in text
    assert b'error_class="worker_killed"' in text
    until_200(front)


def test_a_crash_loop_opens_the_breaker_and_the_front_exits_12(
        tmp_path: Path, tiny_model_path: Path) -> None:
    from metal_guard.cli import EXIT_SERVE_BREAKER

    home = tmp_path / "home"
    env = serve_env(home, METALGUARD_BREAKER_THRESHOLD="2")
    srv = Front(tiny_model_path, tmp_path / "front.log", env)
    try:
        first = srv.child_pid()
        os.kill(first, signal.SIGSEGV)
        second = wait_for(lambda: (pid := srv.child_pid()) != first and pid,
                          timeout=RESPAWN_TIMEOUT_SEC, what="the respawned child")
        os.kill(second, signal.SIGABRT)
        assert srv.proc.wait(timeout=60) == EXIT_SERVE_BREAKER, srv.output()
        assert pid_gone(first) and pid_gone(second)
        assert "circuit breaker open" in srv.output()
        state = json.loads((home / "state" / "breaker.json").read_text())
        assert len(state["failures"]) == 2 and state["cooldown_until"]
    finally:
        srv.stop()
    # launchd/systemd restart it: it refuses at once with the same code, starting no child
    again = Front(tiny_model_path, tmp_path / "again.log", env)
    assert again.proc.wait(timeout=60) == EXIT_SERVE_BREAKER
    again.stop()
    assert "circuit breaker open" in again.output()
    assert not list((home / "state" / "serve").glob(f"*-{again.port}.log"))  # no child started


def _wait_exec(pid: int) -> None:
    def execed() -> bool:
        try:
            return "mlx_lm" in Path(f"/proc/{pid}/cmdline").read_text()
        except OSError:
            return False

    wait_for(execed, what=f"pid {pid} to exec mlx_lm.server")


@pytest.mark.parametrize("watch", ["pdeathsig", "pipe"])
def test_a_killed_front_leaves_no_orphan(tmp_path: Path, tiny_model_path: Path, watch: str) -> None:
    if watch == "pdeathsig" and not os.path.exists("/proc/self"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    srv = Front(tiny_model_path, tmp_path / "front.log", serve_env(tmp_path / "home"),
                "--watch", watch)
    try:
        def child() -> int | None:
            try:
                serve = srv.status()["serve"]
            except OSError:  # not listening yet
                return None
            starting = serve["starting"] or serve["active"]
            return int(starting["pid"]) if starting else None

        pid = wait_for(child, what="the front's first child")
        _wait_exec(pid)
        srv.proc.kill()  # SIGKILL: no cleanup code runs in the front
        srv.proc.wait(timeout=10)
        assert pid_gone(pid, timeout=20), f"child {pid} orphaned ({watch})"
    finally:
        srv.stop()


def test_standby_takes_over_at_once_and_is_replaced(tmp_path: Path, tiny_model_path: Path) -> None:
    srv = Front(tiny_model_path, tmp_path / "front.log", serve_env(tmp_path / "home"), "--standby")
    try:
        srv.wait_ready(standby=True)
        status = srv.status()["serve"]
        active, standby = status["active"]["pid"], status["standby"]["pid"]
        assert active != standby and status["standby"]["ready"] is True
        os.kill(active, signal.SIGSEGV)
        assert pid_gone(active)
        _, reply = until_200(srv)
        assert reply.choices
        status = srv.status()["serve"]
        assert status["standby_switches"] == 1 and status["active"]["pid"] == standby
        assert status["last_crash"]["error_class"] == "worker_segfault"
        health = srv.wait_ready(standby=True)  # a new standby is loaded behind it
        new_standby = srv.status()["serve"]["standby"]["pid"]
        assert health["child_pid"] == standby and new_standby not in (active, standby)
    finally:
        assert srv.stop() == 0
