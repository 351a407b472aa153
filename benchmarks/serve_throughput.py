"""``metal-guard serve`` cost and recovery on the tiny model.

Run by hand (never as a timed unit test)::

    python benchmarks/serve_throughput.py [--seconds 10] [--clients 4] [--ttft-runs 30] [--crash-runs 3]

Measures, in one run against one front and its child (so the model, the process and the
machine are the same on both sides; rounds alternate front / direct to spread noise):

* **requests/s** — ``--clients`` threads sending non-streaming completions (``--max-tokens``)
  through the front vs straight to the child's private port. Goal: front / direct >= 0.95.
  Alongside: CPU milliseconds per request of the front and of the child during the rounds
  through the front (psutil), the figure that decides the ratio on a CPU-bound box.
* **time to first token** — median time from sending a streaming chat completion to its first
  content event, through the front vs direct. Goal: front / direct <= 1.05 (reported as
  direct / front >= 0.95).
* **crash → first 200** — SIGKILL the child, then request until one succeeds; without and with
  ``--standby`` (a second front whose idle standby takes over).

State goes to a throw-away ``METALGUARD_HOME``; the model is built there unless ``--model``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(port: int, method: str, path: str, body: dict[str, Any] | None = None,
            timeout: float = 120.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        conn.request(method, path, data, headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Front:
    def __init__(self, model: Path, env: dict[str, str], *opts: str) -> None:
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="serve-bench-", suffix=".log",  # noqa: SIM115
                                               delete=False)
        cmd = [sys.executable, "-m", "metal_guard", "serve", "--backoff", "0.05", *opts, "--",
               sys.executable, "-m", "mlx_lm", "server", "--model", str(model),
               "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def health(self) -> dict[str, Any]:
        try:
            code, body = request(self.port, "GET", "/health", timeout=5)
        except OSError:
            return {"status": "unreachable"}
        return dict(json.loads(body), code=code)

    def wait_ready(self, standby: bool = False, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"front exited {self.proc.returncode}; log {self.log.name}")
            h = self.health()
            if h.get("code") == 200 and (not standby or h.get("standby_ready")):
                return h
            time.sleep(0.05)
        raise SystemExit(f"front not ready; log {self.log.name}")

    def child(self) -> tuple[int, int]:
        """The active child's (port, pid)."""
        _, body = request(self.port, "GET", "/metal-guard/status")
        active = json.loads(body)["serve"]["active"]
        return int(active["port"]), int(active["pid"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def cpu_sec(pids: list[int]) -> list[float]:
    import psutil

    out = []
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        out.append(t.user + t.system)
    return out


def rps(port: int, seconds: float, clients: int, max_tokens: int,
        counted: list[int] | None = None) -> float:
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0.0}
    stop = time.monotonic() + seconds
    counts = [0] * clients

    def worker(i: int) -> None:
        while time.monotonic() < stop:
            status, _ = request(port, "POST", "/v1/completions", body)
            if status == 200:
                counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if counted is not None:
        counted.append(sum(counts))
    return sum(counts) / (time.monotonic() - start)


def ttft(port: int) -> float:
    body = json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
                       "stream": True, "temperature": 0.0}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        while True:
            line = resp.readline()
            if not line:
                raise RuntimeError("stream ended before any content")
            if line.startswith(b"data: {"):
                elapsed = time.perf_counter() - start
                resp.read()
                return elapsed
    finally:
        conn.close()


def crash_to_200(front: Front, standby: bool) -> float:
    front.wait_ready(standby=standby)
    pid = int(front.health()["child_pid"])
    body = {"prompt": "hi", "max_tokens": 2}
    os.kill(pid, signal.SIGKILL)
    start = time.perf_counter()
    while True:
        try:
            status, _ = request(front.port, "POST", "/v1/completions", body, timeout=60)
        except OSError as exc:
            raise SystemExit(f"connection error after the crash: {exc}") from None
        if status == 200:
            return time.perf_counter() - start
        time.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--seconds", type=float, default=10.0, help="per round and side")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--ttft-runs", type=int, default=30)
    ap.add_argument("--crash-runs", type=int, default=3)
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="mg-serve-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALGUARD_")}
    env.update(METALGUARD_HOME=str(home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               METALGUARD_CADENCE_MIN_INTERVAL_SEC="0", METALGUARD_BREAKER_THRESHOLD="100000")
    os.environ.update({k: v for k, v in env.items() if k.startswith("METALGUARD_")})
    model = args.model
    if model is None:
        from metal_guard.tinymodel import ensure_tiny_lm

        model = ensure_tiny_lm(home / "tiny-lm")

    front = Front(model, env)
    try:
        front.wait_ready()
        child, child_pid = front.child()
        for port in (front.port, child):  # warm both paths
            rps(port, 1.0, args.clients, args.max_tokens)
        via: list[float] = []
        direct: list[float] = []
        served: list[int] = []
        cpu = [0.0, 0.0]
        for _ in range(args.rounds):
            before = cpu_sec([front.proc.pid, child_pid])
            via.append(rps(front.port, args.seconds, args.clients, args.max_tokens, served))
            after = cpu_sec([front.proc.pid, child_pid])
            cpu = [c + b - a for c, a, b in zip(cpu, before, after, strict=True)]
            direct.append(rps(child, args.seconds, args.clients, args.max_tokens))
        t_via: list[float] = []
        t_direct: list[float] = []
        for _ in range(args.ttft_runs):
            t_via.append(ttft(front.port))
            t_direct.append(ttft(child))
        recover = [crash_to_200(front, standby=False) for _ in range(args.crash_runs)]
    finally:
        front.stop()
    standby = Front(model, env, "--standby")
    try:
        recover_standby = [crash_to_200(standby, standby=True) for _ in range(args.crash_runs)]
    finally:
        standby.stop()

    r_via, r_direct = statistics.median(via), statistics.median(direct)
    m_via, m_direct = statistics.median(t_via), statistics.median(t_direct)
    print(json.dumps({
        "requests_per_sec": {"front": round(r_via, 2), "direct": round(r_direct, 2),
                             "ratio": round(r_via / r_direct, 3), "rounds": args.rounds,
                             "clients": args.clients, "max_tokens": args.max_tokens,
                             "cpu_ms_per_request": {
                                 "front": round(cpu[0] * 1e3 / max(1, sum(served)), 3),
                                 "child": round(cpu[1] * 1e3 / max(1, sum(served)), 3)}},
        "ttft_ms_median": {"front": round(m_via * 1e3, 2), "direct": round(m_direct * 1e3, 2),
                           "ratio_direct_over_front": round(m_direct / m_via, 3),
                           "runs": args.ttft_runs},
        "crash_to_first_200_sec": {"restart": [round(x, 2) for x in recover],
                                   "standby": [round(x, 2) for x in recover_standby]},
    }, indent=2))


if __name__ == "__main__":
    main()
