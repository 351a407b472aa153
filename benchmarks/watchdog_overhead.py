"""How much does metal-guard's L5 watchdog cost?

Measures, on the real MLX build installed here:

1. the wall time of one ``memory_stats()`` call (and of its three parts);
2. the CPU time used by the watchdog's scheduler thread while it runs the periodic flush, the
   memory watchdog and the KV-cache monitor, all at ``--interval`` seconds, for ``--seconds``
   seconds (goal: <= 0.5 % of one core at a 1 s interval).

Run:  python benchmarks/watchdog_overhead.py [--seconds 60] [--interval 1.0] [--calls 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any


def _per_call_us(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls // 5):
            fn()
        samples.append((time.perf_counter() - start) / (calls // 5) * 1e6)
    return statistics.median(samples), min(samples)


def _thread_cpu_sec(native_id: int | None) -> float | None:
    """CPU seconds (user + system) of one OS thread of this process, via psutil."""
    if native_id is None:
        return None
    import psutil

    for t in psutil.Process().threads():
        if t.id == native_id:
            return float(t.user_time + t.system_time)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the watchdog runs (default 60)")
    parser.add_argument("--interval", type=float, default=1.0, help="job interval in seconds (default 1)")
    parser.add_argument("--calls", type=int, default=2000, help="memory_stats() calls to time (default 2000)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.interval <= 0 or args.calls < 5:
        parser.error("--seconds and --interval must be > 0, --calls >= 5")

    os.environ.setdefault("METALGUARD_HOME", tempfile.mkdtemp(prefix="mg-bench-"))
    from metal_guard import backend, hardware
    from metal_guard.instance import MetalGuard
    from metal_guard.memory import memory_stats

    mx = backend.core()
    if mx is None:
        print("MLX is not installed; nothing to measure", file=sys.stderr)
        return 2

    keep = mx.ones((16 << 20,), dtype=mx.uint8)  # something for the counters to report
    mx.eval(keep)

    rows: list[tuple[str, str]] = [
        ("mlx / backend", f"{backend.mlx_version()} / {backend.backend_name()}"),
        ("python", sys.version.split()[0]),
    ]
    for label, fn in (
        ("memory_stats() [full snapshot]", lambda: memory_stats(load=False)),
        ("  backend.memory_counters()", lambda: backend.memory_counters(load=False)),
        ("  hardware.process_footprint()", hardware.process_footprint),
        ("  hardware.system_memory()", hardware.system_memory),
    ):
        median, best = _per_call_us(fn, args.calls)
        rows.append((label, f"{median:8.1f} us median ({best:.1f} best)"))

    guard = MetalGuard(cooldown_secs=0.0)
    guard.start_periodic_flush(args.interval)
    guard.start_watchdog(args.interval, warn_pct=99.0, critical_pct=99.5)
    kv = guard.start_kv_cache_monitor(args.interval)
    thread = guard.watchdog.scheduler._thread
    native_id = thread.native_id if thread is not None else None
    cpu0, proc0, wall0 = _thread_cpu_sec(native_id), time.process_time(), time.monotonic()
    stop = threading.Event()
    stop.wait(args.seconds)  # the main thread idles; only the watchdog works
    cpu1, proc1, wall1 = _thread_cpu_sec(native_id), time.process_time(), time.monotonic()
    info = guard.watchdog.scheduler.job_info()
    stopped = guard.stop_all()
    wall = wall1 - wall0
    ticks = sum(j["runs"] for j in info.values())

    rows.append(("watchdog run", f"{wall:.1f} s, 3 jobs @ {args.interval:g} s, {ticks} job runs"))
    if cpu0 is not None and cpu1 is not None:
        cpu = cpu1 - cpu0
        rows.append(("watchdog thread CPU", f"{cpu * 1e3:.1f} ms = {100 * cpu / wall:.3f} % of one core"))
        if ticks:
            rows.append(("  per job run", f"{cpu / ticks * 1e6:.0f} us"))
    rows.append(("whole process CPU", f"{(proc1 - proc0) * 1e3:.1f} ms = {100 * (proc1 - proc0) / wall:.3f} % of one core"))
    rows.append(("KV samples kept", str(len(kv.samples))))
    rows.append(("stop_all() clean", str(stopped)))

    width = max(len(k) for k, _ in rows)
    print(f"{'metric':<{width}}  value")
    print(f"{'-' * width}  {'-' * 44}")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    del keep
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
