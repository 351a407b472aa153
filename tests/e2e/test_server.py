"""End to end: the real ``mlx_lm.server`` started with ``metal-guard run --`` (zero code).

``python -m metal_guard run -- python -m mlx_lm server --model <tiny> --host 127.0.0.1 --port P``
— the same process tree a user gets from ``metal-guard run -- mlx_lm.server ...``. The OOM is
injected by the adapter's test-only fault (``METALGUARD_TEST_SERVER_OOM_EVERY``, read through
Settings): the N-th request's sampler raises MLX's exact Metal OOM text from inside the
generation step, on the batched path and on the sequential (seeded) path.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mlx_lm.server")

from serve_helpers import ServerProcess

pytestmark = pytest.mark.e2e

class GuardedServer(ServerProcess):
    """``python -m metal_guard run -- python -m mlx_lm server --model M ... --port P``."""

    def __init__(self, model: Path, log_path: Path, env: dict[str, str]) -> None:
        super().__init__(lambda port: [
            sys.executable, "-m", "metal_guard", "run", "--",
            sys.executable, "-m", "mlx_lm", "server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), "--max-tokens", "8"], log_path, env)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)  # METALGUARD_HOME etc. come from the isolating fixture
    env.update(extra)
    return env


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    servers: list[GuardedServer] = []

    def _start(model: Path, **env: str) -> GuardedServer:
        srv = GuardedServer(model, tmp_path / f"server-{len(servers)}.log", _env(**env))
        servers.append(srv)
        srv.wait_ready()
        return srv

    yield _start
    for srv in servers:
        srv.stop()


COMPLETION = {"prompt": "the quick brown fox", "max_tokens": 3}
CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


def test_guarded_server_serves_answers_503_on_oom_and_recovers(start: Any, tiny_model_path: Path) -> None:
    srv = start(tiny_model_path, METALGUARD_TESTING="1", METALGUARD_TEST_SERVER_OOM_EVERY="3")

    status, body = srv.post("/v1/completions", COMPLETION)                 # request 1
    assert status == 200 and body["choices"][0]["text"], body
    status, body = srv.post("/v1/chat/completions", CHAT)                  # request 2
    assert status == 200 and body["choices"][0]["message"]["content"] is not None, body

    status, headers, raw = srv.request("/v1/completions", COMPLETION)      # 3: OOM, batched path
    assert status == 503, raw
    assert json.loads(raw)["error"]["code"] == "metal_oom" and headers["Retry-After"] == "1"
    assert srv.post("/v1/completions", COMPLETION)[0] == 200               # 4: served again
    assert srv.post("/v1/chat/completions", {**CHAT, "seed": 7})[0] == 200  # 5: sequential path
    status, body = srv.post("/v1/completions", {**COMPLETION, "seed": 7})  # 6: OOM, sequential
    assert status == 503 and body["error"]["code"] == "metal_oom"
    assert srv.post("/v1/completions", COMPLETION)[0] == 200               # 7
    assert srv.get("/health")[0] == 200

    status, _h, raw = srv.get("/metal-guard/status")
    assert status == 200
    snap = json.loads(raw)
    assert snap["adapters"]["mlx_lm"] == "patched" and snap["adapters"]["mlx_lm_server"] == "patched"
    server = snap["server"]
    assert server["generation_alive"] is True
    assert server["requests_total"] == 7 and server["responses_503_total"] == 2
    assert server["oom_total"] == 2 and server["oom_recoveries_total"] == 1
    assert snap["writer"]["pid"] == srv.proc.pid  # `run` exec'd: same process

    status, _h, raw = srv.get("/metrics")
    assert status == 200
    assert "metal_guard_server_responses_503_total 2" in raw.decode()
    assert "SERVER_OOM_RECOVERED" in "\n".join(snap["breadcrumb_tail"])


def _client(srv: GuardedServer, n: int, latencies: list[float], errors: list[str]) -> None:
    for i in range(n):
        body = CHAT if i % 2 else COMPLETION
        path = "/v1/chat/completions" if i % 2 else "/v1/completions"
        started = time.perf_counter()
        try:
            status, _h, raw = srv.request(path, {**body, "max_tokens": 2})
        except OSError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        latencies.append(time.perf_counter() - started)
        if status != 200:
            errors.append(f"{status}: {raw[:200]!r}")


def test_eight_concurrent_clients_fifty_requests_each(start: Any, tiny_model_path: Path) -> None:
    srv = start(tiny_model_path)
    clients, per_client = 8, 50
    latencies: list[float] = []
    errors: list[str] = []
    threads = [threading.Thread(target=_client, args=(srv, per_client, latencies, errors))
               for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    wall = time.perf_counter() - started
    assert errors == [], errors[:5]
    assert len(latencies) == clients * per_client
    latencies.sort()
    p50 = statistics.median(latencies)
    p95 = latencies[int(0.95 * len(latencies)) - 1]
    print(f"\n[e2e server] {clients}x{per_client} requests in {wall:.2f}s: "
          f"{len(latencies) / wall:.1f} req/s, p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms")
    snap = json.loads(srv.get("/metal-guard/status")[2])
    assert snap["server"]["requests_total"] == clients * per_client
    assert snap["server"]["responses_503_total"] == 0 and snap["server"]["generation_alive"]
