"""How fast are the report scan and the prompt stops? (speed checks moved out of the unit tests)

Measures, in one run, the figures the unit tests used to assert as wall-clock upper bounds:

1. ``scan_reports`` over ``--files`` old report files plus one fresh panic (the old ones are
   skipped by name, unread), next to a plain ``os.scandir`` of the same directory (the floor);
2. ``parse_report_file`` of a 50 MB ``.panic`` (only the read cap is read), next to reading that
   cap from the file with ``open().read(cap)`` (the floor);
3. how long ``Scheduler.stop()`` takes while a job sits in a 30 s cool-down (the
   watchdog's stop cuts it short), and ``ThreadRegistry.wait(0.3)`` over three blocked threads
   (one total deadline: ~0.3 s, not 0.9 s).

Run:  python benchmarks/report_scan.py [--files 10000] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

PANIC = ("panic(cpu 4 caller 0xfffffe0014a3c2d0): \"IOGPUMemory.cpp:550 Assertion failed: "
         "prepare count underflow\"\n")


def _median_ms(fn: Callable[[], Any], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _write_panic(directory: Path, ts: float, padding: int = 0) -> Path:
    stamp = datetime.fromtimestamp(ts).strftime("%Y-%m-%d-%H%M%S")
    path = directory / f"panic-full-{stamp}.0002.panic"
    body = f"Date/Time: {datetime.fromtimestamp(ts).strftime('%Y-%m-%d %H:%M:%S')}\n{PANIC}"
    with path.open("w") as fh:
        fh.write(body)
        if padding:
            fh.write("x" * padding)
    return path


def bench_scan(files: int, runs: int) -> None:
    from metal_guard.forensics.reports import scan_reports

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        now = time.time()
        for i in range(files):
            stamp = datetime.fromtimestamp(now - 10 * 86400 - i * 3600).strftime("%Y-%m-%d-%H%M%S")
            name = f"panic-full-{stamp}.0002.panic" if i % 3 == 0 else f"Python-{stamp}.ips"
            (root / name).write_text("{}")
        _write_panic(root, now - 3600)

        def scan() -> None:
            result = scan_reports([root], panic_since_ts=now - 72 * 3600,
                                  crash_since_ts=now - 86400, now=now)
            assert len(result.records) == 1

        def floor() -> None:
            with os.scandir(root) as it:
                sum(1 for _ in it)

        scan_ms, floor_ms = _median_ms(scan, runs), _median_ms(floor, runs)
        print(f"scan_reports, {files} old reports + 1 fresh: {scan_ms:.1f} ms "
              f"(os.scandir alone {floor_ms:.1f} ms; ratio {scan_ms / floor_ms:.1f})")


def bench_big_report(runs: int) -> None:
    from metal_guard.forensics.reports import MAX_READ_BYTES, parse_report_file

    with tempfile.TemporaryDirectory() as tmp:
        path = _write_panic(Path(tmp), time.time() - 600, padding=50 * 1024 * 1024)

        def parse() -> None:
            record = parse_report_file(path)
            assert record is not None and record.extra.get("truncated") is True

        def floor() -> None:
            with path.open("rb") as fh:
                fh.read(MAX_READ_BYTES)

        parse_ms, floor_ms = _median_ms(parse, runs), _median_ms(floor, runs)
        print(f"parse_report_file, 50 MB report (cap {MAX_READ_BYTES / 1e6:.1f} MB): {parse_ms:.1f} ms "
              f"(reading the cap alone {floor_ms:.1f} ms)")


def bench_stops(runs: int) -> None:
    from metal_guard.cleanup import ThreadRegistry
    from metal_guard.watchdog import Scheduler

    stops = []
    for _ in range(runs):
        sched = Scheduler()
        entered = threading.Event()

        def slow(s: Scheduler = sched, e: threading.Event = entered) -> None:
            e.set()
            s.sleep(30)

        sched.add("slow", 0.01, slow, first_in=0)
        sched.start()
        entered.wait(10)
        start = time.perf_counter()
        assert sched.stop(timeout=30)
        stops.append((time.perf_counter() - start) * 1e3)
    print(f"Scheduler.stop() during a 30 s cool-down: {statistics.median(stops):.2f} ms median")

    registry = ThreadRegistry()
    releases = []
    for _ in range(3):
        release = threading.Event()
        t = threading.Thread(target=release.wait, args=(30,), daemon=True)
        t.start()
        registry.register(t)
        releases.append(release)
    start = time.perf_counter()
    alive = registry.wait(0.3)
    waited = time.perf_counter() - start
    for release in releases:
        release.set()
    print(f"ThreadRegistry.wait(0.3) over 3 blocked threads: {waited:.3f} s, {alive} still alive "
          "(one total deadline; per-thread timeouts would be 0.9 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("METALGUARD_HOME", tempfile.mkdtemp(prefix="mg-bench-"))
    bench_scan(args.files, args.runs)
    bench_big_report(args.runs)
    bench_stops(args.runs)


if __name__ == "__main__":
    main()
