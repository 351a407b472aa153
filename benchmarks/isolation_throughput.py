"""L7 isolation cost on the tiny model: streaming throughput and crash recovery time.

Run by hand (never as a timed unit test)::

    python benchmarks/isolation_throughput.py [--tokens 3000] [--runs 5] [--crash-runs 5]
    python benchmarks/isolation_throughput.py --crash-cycles 200      # leak soak

Measures, on the same model and prompt (greedy, no chat template):

* **throughput** — tokens/s of ``mlx_lm.stream_generate`` in this process vs
  ``MLXSubprocessRunner.stream_generate`` through a worker (one frame per token).
  Goal: worker / in-process >= 0.90.
* **recovery** — from a real crash (``os.abort()`` in the worker) to the respawned worker's
  first answer, vs a *plain model load*: a fresh interpreter doing ``import mlx_lm`` +
  ``mlx_lm.load`` (what any new process pays to get the model). Goal: <= load + 0.5 s.
  The cold start of a worker (constructor wall time) is reported as well.
* ``--crash-cycles N`` — N crash/respawn cycles (abort, 1 TiB allocation, SIGKILL in turn);
  checks that no process, zombie, file descriptor or thread is left behind.

State goes to a throw-away ``METALGUARD_HOME``; the model is built there unless ``--model``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

FAULTS = {"METALGUARD_TESTING": "1", "METALGUARD_WORKER_TEST_FAULTS": "1"}
PROMPT = "Once upon a time"
LOAD_CODE = ("import time, sys; t = time.perf_counter(); import mlx_lm; "
             "mlx_lm.load(sys.argv[1]); print(time.perf_counter() - t)")


def throughput(model_path: str, tokens: int, runs: int) -> dict[str, float]:
    """Alternate in-process and worker runs (pairs share the machine's noise)."""
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    from metal_guard.isolation import MLXSubprocessRunner

    model, tok = mlx_lm.load(model_path)

    def local() -> float:
        start = time.perf_counter()
        count = 0
        for response in mlx_lm.stream_generate(model, tok, PROMPT, max_tokens=tokens,
                                               sampler=make_sampler(0.0)):
            count = response.generation_tokens
        return count / (time.perf_counter() - start)

    def remote(runner: Any) -> tuple[float, float]:
        start = time.perf_counter()
        for _chunk in runner.stream_generate(PROMPT, max_tokens=tokens, temperature=0.0,
                                             apply_chat_template=False):
            pass
        elapsed = time.perf_counter() - start
        done = runner.last_result
        return done["generation_tokens"] / elapsed, done["generation_tps"]

    pairs, ipc = [], []
    with MLXSubprocessRunner(model_path) as runner:
        local()
        remote(runner)  # warm-up: kernel compilation on both sides
        for _ in range(runs):
            mine = local()
            seen, own = remote(runner)
            pairs.append((mine, seen))
            ipc.append(seen / own)  # what the caller sees vs what the worker generated
    return {"in_process_tps": statistics.median(p[0] for p in pairs),
            "worker_tps": statistics.median(p[1] for p in pairs),
            "throughput_ratio": statistics.median(p[1] / p[0] for p in pairs),
            "ipc_efficiency": statistics.median(ipc)}


def plain_load_sec(model_path: str, runs: int) -> tuple[float, float]:
    """(wall time of a fresh interpreter importing mlx_lm and loading, in-process part)."""
    walls, inner = [], []
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", LOAD_CODE, model_path], check=True,
                             capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        inner.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(walls), statistics.median(inner)


def recovery(model_path: str, runs: int) -> dict[str, float]:
    from metal_guard.errors import SubprocessCrashError
    from metal_guard.isolation import MLXSubprocessRunner
    from metal_guard.testing import inject_worker_fault

    cold, again = [], []
    for _ in range(runs):
        start = time.perf_counter()
        runner = MLXSubprocessRunner(model_path, env=FAULTS)
        cold.append(time.perf_counter() - start)
        runner.generate(PROMPT, max_tokens=1)
        start = time.perf_counter()
        try:
            inject_worker_fault(runner, "abort")
        except SubprocessCrashError:
            pass
        runner.generate(PROMPT, max_tokens=1)
        again.append(time.perf_counter() - start)
        runner.shutdown()
    return {"cold_start_sec": statistics.median(cold),
            "crash_to_ready_sec": statistics.median(again)}


def crash_cycles(model_path: str, cycles: int) -> dict[str, Any]:
    import psutil

    from metal_guard.errors import SubprocessCrashError
    from metal_guard.isolation import MLXSubprocessRunner
    from metal_guard.testing import inject_worker_fault

    me = psutil.Process()
    fds, threads = me.num_fds(), threading.active_count()
    runner = MLXSubprocessRunner(model_path, env=FAULTS)
    start = time.perf_counter()
    for i in range(cycles):
        try:
            kind = ("abort", "huge_alloc", "sigkill")[i % 3]
            if kind == "sigkill":
                stream = runner.stream_generate(PROMPT, max_tokens=1_000_000)
                next(stream)
                os.kill(runner.worker_pid, signal.SIGKILL)
                for _ in stream:
                    pass
            else:
                inject_worker_fault(runner, kind)
            raise AssertionError(f"cycle {i}: {kind} did not crash the worker")
        except SubprocessCrashError:
            pass
        runner.generate(PROMPT, max_tokens=2)
        if (i + 1) % 20 == 0:
            print(f"  {i + 1}/{cycles} cycles, {runner.crash_count} crashes", flush=True)
    elapsed = time.perf_counter() - start
    runner.shutdown()
    deadline = time.monotonic() + 5
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.05)
    leftovers = me.children(recursive=True)
    return {"cycles": cycles, "crashes": runner.crash_count,
            "sec_per_cycle": elapsed / cycles, "leftover_processes": len(leftovers),
            "fd_delta": me.num_fds() - fds, "thread_delta": threading.active_count() - threads}


def main() -> None:
    os.environ.setdefault("METALGUARD_TESTING", "1")  # the fault hooks (metal_guard.testing)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an mlx_lm model dir (default: build the tiny model)")
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--crash-runs", type=int, default=5)
    parser.add_argument("--crash-cycles", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="mg-iso-bench-")
    os.environ["METALGUARD_HOME"] = home
    os.environ["METALGUARD_BREAKER_THRESHOLD"] = "1000000"  # crashes here are on purpose
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if args.model:
        model_path = args.model
    else:
        from metal_guard.tinymodel import ensure_tiny_lm

        model_path = str(ensure_tiny_lm(Path(home) / "tiny-lm"))
    results: dict[str, Any] = {"model": model_path, "tokens": args.tokens}
    if args.crash_cycles:
        results["crash_cycles"] = crash_cycles(model_path, args.crash_cycles)
    else:
        results.update(throughput(model_path, args.tokens, args.runs))
        wall, inner = plain_load_sec(model_path, args.crash_runs)
        results["plain_load_sec"] = wall
        results["plain_load_in_process_sec"] = inner
        results.update(recovery(model_path, args.crash_runs))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    if "crash_cycles" in results:
        c = results["crash_cycles"]
        ok = c["leftover_processes"] == 0 and c["fd_delta"] == 0 and c["thread_delta"] <= 0
        print(f"crash/respawn cycles  {c['cycles']} ({c['crashes']} crashes), "
              f"{c['sec_per_cycle']:.2f} s/cycle")
        print(f"leftovers             processes {c['leftover_processes']}, fds {c['fd_delta']:+d}, "
              f"threads {c['thread_delta']:+d} -> {'PASS' if ok else 'FAIL'}")
        return
    ratio = results["throughput_ratio"]
    budget = results["plain_load_sec"] + 0.5
    print(f"in-process stream     {results['in_process_tps']:8.1f} tok/s  ({args.tokens} tokens)")
    print(f"worker stream         {results['worker_tps']:8.1f} tok/s")
    print(f"ratio (paired median) {ratio:8.3f}   goal >= 0.90 -> {'PASS' if ratio >= 0.9 else 'FAIL'}")
    print(f"IPC efficiency        {results['ipc_efficiency']:8.3f}   (tok/s the caller sees / "
          "tok/s the worker generated)")
    print(f"plain load            {results['plain_load_sec']:8.3f} s  (fresh interpreter: import "
          f"mlx_lm + load; in-process part {results['plain_load_in_process_sec']:.3f} s)")
    print(f"worker cold start     {results['cold_start_sec']:8.3f} s")
    print(f"crash -> ready again  {results['crash_to_ready_sec']:8.3f} s   goal <= "
          f"{budget:.3f} s -> {'PASS' if results['crash_to_ready_sec'] <= budget else 'FAIL'}")


if __name__ == "__main__":
    main()
