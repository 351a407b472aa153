"""A real ``metal-guard serve`` front (subprocess) around the real ``mlx_lm.server``, for tests
and benchmarks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

READY_TIMEOUT_SEC = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALGUARD_")}
    env.update(METALGUARD_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", METALGUARD_CADENCE_MIN_INTERVAL_SEC="0",
               METALGUARD_BREAKER_THRESHOLD="1000",
               METALGUARD_DIAGNOSTIC_REPORTS_DIRS=str(home / "no-reports"))
    env.update(extra)
    return env


class Front:
    """``python -m metal_guard serve [opts] -- python -m mlx_lm.server --model M --port P``."""

    def __init__(self, model: Path, log_path: Path, env: dict[str, str], *opts: str,
                 server_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "metal_guard", "serve", "--backoff", "0.05", *opts, "--",
               sys.executable, "-m", "mlx_lm.server", "--model", str(model),
               "--port", str(self.port), *server_args]
        self.log_path = log_path
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.get("/metal-guard/status")[2]))

    def wait_ready(self, *, standby: bool = False, timeout: float = READY_TIMEOUT_SEC) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"front exited {self.proc.returncode}:\n{self.output()}")
            try:
                code, _, body = self.get("/health", timeout=5.0)
            except OSError:
                time.sleep(0.1)
                continue
            health = json.loads(body)
            if code == 200 and (not standby or health.get("standby_ready")):
                return dict(health)
            time.sleep(0.05)
        raise AssertionError(f"front not ready in {timeout}s:\n{self.output()}")

    def child_pid(self) -> int:
        return int(self.wait_ready()["child_pid"])

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        return self.proc.returncode


def pid_gone(pid: int, timeout: float = 15.0) -> bool:
    """True once ``pid`` no longer exists (or is a zombie) within ``timeout``."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False
