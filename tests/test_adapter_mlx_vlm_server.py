"""The ``mlx_vlm.server`` adapter on the real FastAPI app and the tiny VLM, in fresh interpreters
(the app module is a process-wide singleton, and its generation thread must be stopped through
the app's own lifespan)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mlx_vlm")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")

CLIENT = """
    import json, os, sys, warnings
    warnings.simplefilter("ignore")
    import metal_guard
    metal_guard.install(cadence=False)
    from fastapi.testclient import TestClient
    import mlx_vlm.server
    app = sys.modules["mlx_vlm.server.app"].app
    out = {}
    with TestClient(app) as client:
        status = client.get("/metal-guard/status")
        out["status"] = status.status_code
        out["server"] = status.json()["server"]
        out["adapter"] = status.json()["adapters"]["mlx_vlm_server"]
        out["metrics"] = client.get("/metal-guard/metrics").status_code
        body = {"model": sys.argv[1], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        replies = [client.post("/v1/chat/completions", json=body) for _ in range(2)]
        out["codes"] = [r.status_code for r in replies]
        out["retry_after"] = replies[0].headers.get("retry-after")
        out["first"] = replies[0].json()
        out["bad_request"] = client.get("/v1/no-such-route").status_code
    print(json.dumps(out))
"""


def test_oom_answers_503_and_status_route_reports_limits(tiny_vlm_path: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALGUARD_")}
    env.update(METALGUARD_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1",
               METALGUARD_TESTING="1",
               METALGUARD_TEST_SERVER_OOM_EVERY="2")  # the 1st request works, the 2nd OOMs
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CLIENT), str(tiny_vlm_path)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == 200 and out["metrics"] == 200 and out["adapter"] == "patched"
    assert out["server"]["kind"] == "mlx_vlm.server" and len(out["server"]["limitations"]) == 3
    assert out["codes"] == [200, 503]
    assert out["bad_request"] == 404  # other HTTP errors keep FastAPI's own answers


def test_second_oom_reply_carries_retry_after(tiny_vlm_path: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALGUARD_")}
    env.update(METALGUARD_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1",
               METALGUARD_TESTING="1", METALGUARD_TEST_SERVER_OOM_EVERY="1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CLIENT), str(tiny_vlm_path)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["codes"] == [503, 503] and out["retry_after"] == "1"
    error = out["first"]["error"]  # OpenAI-shaped, like the mlx_lm.server adapter's
    assert error["code"] == "metal_oom" and error["type"] == "service_unavailable_error"
    assert "Insufficient Memory" in error["message"]


def test_uninstall_removes_the_routes() -> None:
    code = textwrap.dedent("""
        import sys, warnings
        warnings.simplefilter("ignore")
        import metal_guard
        metal_guard.install()
        import mlx_vlm.server
        app = sys.modules["mlx_vlm.server.app"].app
        paths = lambda: {getattr(r, "path", None) for r in app.router.routes}
        before = "/metal-guard/status" in paths()
        metal_guard.uninstall()
        print(before, "/metal-guard/status" in paths(), len(app.exception_handlers))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALGUARD_")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after, _handlers = proc.stdout.split()
    assert (before, after) == ("True", "False")
