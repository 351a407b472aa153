"""Median extra wall time of ``import metal_guard`` over a bare interpreter.

Run: python benchmarks/import_time.py [--runs 30]
Goal: <= 30 ms (the reference implementation needs ~165 ms).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def _time(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    bare, guarded, touched = [], [], []
    for _ in range(args.runs):  # interleave to share noise
        bare.append(_time("pass"))
        guarded.append(_time("import metal_guard"))
        touched.append(_time("import metal_guard; metal_guard.get_settings()"))
    b = statistics.median(bare)
    g = statistics.median(guarded)
    t = statistics.median(touched)
    print(f"bare interpreter            median {b * 1e3:7.1f} ms")
    print(f"import metal_guard          median {g * 1e3:7.1f} ms  (+{(g - b) * 1e3:.1f} ms)")
    print(f"... + get_settings()        median {t * 1e3:7.1f} ms  (+{(t - b) * 1e3:.1f} ms)")
    print(f"goal: import overhead <= 30 ms -> {'PASS' if (g - b) * 1e3 <= 30 else 'FAIL'}")


if __name__ == "__main__":
    main()
