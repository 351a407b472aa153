"""Guarded vs raw ``mlx_lm.server`` throughput on the tiny local model (one run, ratio).

Run: python benchmarks/server_throughput.py [--clients 4] [--requests 25] [--json]

Starts the library's own server in-process on 127.0.0.1 twice — once plain, once with
``metal_guard.install()`` — and sends the same completions from N concurrent clients
(batched path: request tracking, keep-alive checks, the generate policy on
``BatchGenerator.insert_segments``, the per-step policy). Reports requests/s and the
guarded/raw ratio measured in the same run (absolute numbers depend on the machine's load).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _run(model: Path, clients: int, requests: int, guarded: bool) -> dict[str, Any]:
    from server_support import Server, wait_for

    from metal_guard import installer as mg

    if guarded:
        mg.install()
    srv = Server(model)
    try:
        if guarded:
            wait_for(lambda: getattr(srv.state(), "phase", "ready") == "ready", what="ready")
        srv.complete("warm up")
        latencies: list[float] = []
        errors: list[int] = []

        def client() -> None:
            for i in range(requests):
                start = time.perf_counter()
                status, _ = srv.complete(f"request {i}", max_tokens=4)
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    errors.append(status)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
    finally:
        srv.close()
        if guarded:
            mg.uninstall()
    return {"req_per_sec": round(len(latencies) / wall, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 1), "errors": len(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["METALGUARD_HOME"] = home
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from metal_guard.tinymodel import ensure_tiny_lm

        model = ensure_tiny_lm(Path(home) / "tiny-lm")
        raw = _run(model, args.clients, args.requests, guarded=False)
        guarded = _run(model, args.clients, args.requests, guarded=True)
    ratio = round(guarded["req_per_sec"] / raw["req_per_sec"], 3) if raw["req_per_sec"] else None
    result = {"clients": args.clients, "requests_per_client": args.requests, "raw": raw,
              "guarded": guarded, "guarded_over_raw_throughput": ratio}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.clients} clients x {args.requests} completions (tiny model, batched path)")
        print(f"  raw      {raw['req_per_sec']:7.1f} req/s  p50 {raw['p50_ms']:6.1f} ms  errors {raw['errors']}")
        print(f"  guarded  {guarded['req_per_sec']:7.1f} req/s  p50 {guarded['p50_ms']:6.1f} ms  "
              f"errors {guarded['errors']}")
        print(f"  guarded/raw throughput: {ratio}")


if __name__ == "__main__":
    main()
