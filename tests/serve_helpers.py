"""Real server processes for tests and benchmarks: ``metal-guard serve`` (the front) around the
real ``mlx_lm.server``, and any other server command line on a free port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support import HttpClient, free_port, pid_gone, wait_for

__all__ = ["READY_TIMEOUT_SEC", "Front", "ServerProcess", "free_port", "pid_gone", "serve_env"]

READY_TIMEOUT_SEC = 180.0


def serve_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALGUARD_")}
    env.update(METALGUARD_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", METALGUARD_CADENCE_MIN_INTERVAL_SEC="0",
               METALGUARD_BREAKER_THRESHOLD="1000",
               METALGUARD_DIAGNOSTIC_REPORTS_DIRS=str(home / "no-reports"))
    env.update(extra)
    return env


class ServerProcess(HttpClient):
    """``command(port)`` started on a free 127.0.0.1 port, stdout and stderr to ``log_path``."""

    def __init__(self, command: Callable[[int], list[str]], log_path: Path,
                 env: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(command(self.port), stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.get("/metal-guard/status")[2]))

    def wait_ready(self, *, standby: bool = False,
                   timeout: float = READY_TIMEOUT_SEC) -> dict[str, Any]:
        """Wait until ``/health`` answers 200 (and, with ``standby``, reports the standby
        ready); its JSON body. Fails at once if the process exits."""

        def health() -> list[dict[str, Any]] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                code, _, body = self.get("/health", timeout=5.0)
            except OSError:  # not listening yet
                return None
            try:
                answer = json.loads(body)
            except ValueError:
                answer = {}
            if code == 200 and (not standby or answer.get("standby_ready")):
                return [dict(answer)]
            return None

        try:
            return dict(wait_for(health, timeout=timeout, what="the server's /health")[0])
        except AssertionError as exc:
            if self.proc.poll() is not None:
                raise
            raise AssertionError(f"{exc}:\n{self.output()}") from None

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


class Front(ServerProcess):
    """``python -m metal_guard serve [opts] -- python -m mlx_lm.server --model M --port P``."""

    def __init__(self, model: Path, log_path: Path, env: dict[str, str], *opts: str,
                 server_args: tuple[str, ...] = ()) -> None:
        def command(port: int) -> list[str]:
            return [sys.executable, "-m", "metal_guard", "serve", "--backoff", "0.05", *opts, "--",
                    sys.executable, "-m", "mlx_lm.server", "--model", str(model),
                    "--port", str(port), *server_args]

        super().__init__(command, log_path, env)

    def child_pid(self) -> int:
        return int(self.wait_ready()["child_pid"])
