"""L8 lock cost: uncontended acquire/release, re-entrant acquire, and N-process contention.

Run by hand (never as a timed unit test)::

    python benchmarks/lock_contention.py [--procs 8] [--iterations 500] [--rounds 2000]

State goes to a throw-away ``METALGUARD_HOME``; nothing touches the real lock.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONTENDER = r"""
import os, sys, time
from pathlib import Path
from metal_guard.lock import mlx_exclusive_lock
n, start = int(sys.argv[1]), Path(sys.argv[2])
while not start.exists():
    time.sleep(0.002)
waits = []
for _ in range(n):
    t0 = time.perf_counter()
    with mlx_exclusive_lock("bench", timeout=300):
        waits.append(time.perf_counter() - t0)
waits.sort()
print(waits[len(waits) // 2], waits[int(len(waits) * 0.99)], waits[-1])
"""


def _uncontended(rounds: int) -> dict[str, float]:
    from metal_guard.lock import acquire_mlx_lock, release_mlx_lock

    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        acquire_mlx_lock("bench")
        release_mlx_lock()
        samples.append(time.perf_counter() - t0)
    acquire_mlx_lock("outer")
    t0 = time.perf_counter()
    for _ in range(rounds):
        acquire_mlx_lock("inner")
        release_mlx_lock()
    reentrant = (time.perf_counter() - t0) / rounds
    release_mlx_lock()
    samples.sort()
    return {
        "acquire_release_median_ms": statistics.median(samples) * 1e3,
        "acquire_release_p99_ms": samples[int(len(samples) * 0.99)] * 1e3,
        "reentrant_acquire_release_us": reentrant * 1e6,
    }


def _contended(procs: int, iterations: int, workdir: Path) -> dict[str, float]:
    start = workdir / "start"
    children = [
        subprocess.Popen([sys.executable, "-c", CONTENDER, str(iterations), str(start)],
                         stdout=subprocess.PIPE, text=True)
        for _ in range(procs)
    ]
    time.sleep(1.0)
    t0 = time.perf_counter()
    start.touch()
    outputs = [c.communicate()[0] for c in children]
    elapsed = time.perf_counter() - t0
    if any(c.returncode for c in children):
        raise SystemExit("a contender failed")
    stats = [tuple(map(float, line.split())) for line in outputs]
    total = procs * iterations
    return {
        "procs": procs,
        "acquisitions": total,
        "elapsed_s": elapsed,
        "acquisitions_per_s": total / elapsed,
        "wait_median_ms": statistics.median(s[0] for s in stats) * 1e3,
        "wait_p99_ms_worst_proc": max(s[1] for s in stats) * 1e3,
        "wait_max_ms": max(s[2] for s in stats) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["METALGUARD_HOME"] = tmp
        result = {
            "uncontended": _uncontended(args.rounds),
            "contended": _contended(args.procs, args.iterations, Path(tmp)),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
