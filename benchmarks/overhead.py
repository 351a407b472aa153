"""What metal-guard's integration layer costs.

Run: python benchmarks/overhead.py [--quick] [--json] [--skip-startup] [--skip-e2e]

1. guard cost per guarded call, on a no-op target wrapped exactly as ``install()`` wraps
   ``mlx_lm.generate`` (generate policy, outermost call)            goal <= 10 us
   (also: ``@guarded_generate`` on a no-op, and the load policy on a no-op loader, for context)
2. guard cost per streamed item, on a no-op generator               goal <= 2 us
3. end to end: ``mlx_lm.generate`` on the tiny local model, raw vs guarded (for context)
4. interpreter start-up, fresh venv with the built wheel, no MLX import:
   bare venv vs metal-guard installed (autoload off) vs METALGUARD_AUTOLOAD=1
                                                                    goal <= 5 ms over bare
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _per_call(fn: Any, n: int, repeat: int = 7) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best


def bench_guards(quick: bool) -> dict[str, float]:
    from metal_guard import installer as mg
    from metal_guard.adapters.base import guard_wrapper, make_guard
    from metal_guard.guards import guarded_generate
    from metal_guard.policy import CallInfo

    mg.install(adapters=[], cadence=False)  # activates install-made wrappers, patches nothing
    gen_id = mg._state.generation  # type: ignore[union-attr]

    class Model:
        pass

    model = Model()

    def noop(model: Any, tokenizer: Any, prompt: Any) -> None:
        return None

    def describe(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallInfo:
        return CallInfo("bench:generate", model=args[0], prompt_tokens=None)

    installed = make_guard(noop, guard_wrapper("generate", "call", site="bench:generate",
                                               describe=describe, generation=gen_id),
                           site="bench:generate", generation=gen_id)
    decorated = guarded_generate(noop)
    n = 20_000 if quick else 100_000
    raw = _per_call(lambda: noop(model, None, "p"), n)
    guarded = _per_call(lambda: installed(model, None, "p"), n)
    deco = _per_call(lambda: decorated(model, None, "p"), n)

    def items(count: int) -> Any:
        yield from range(count)

    stream = make_guard(items, guard_wrapper("generate", "gen", site="bench:stream", generation=gen_id),
                        site="bench:stream", generation=gen_id)
    count = 200_000 if quick else 1_000_000

    def drain(gen: Any) -> float:
        start = time.perf_counter()
        for _ in gen:
            pass
        return (time.perf_counter() - start) / count

    raw_item = min(drain(items(count)) for _ in range(3))
    guarded_item = min(drain(stream(count)) for _ in range(3))

    loads = []

    def loader(path: str) -> tuple[Any, Any]:
        return Model(), None

    load = make_guard(loader, guard_wrapper("load", "call", site="bench:load",
                                            describe=lambda i, a, k: CallInfo("bench:load", model_id=a[0]),
                                            generation=gen_id), site="bench:load", generation=gen_id)
    for i in range(20 if quick else 50):
        start = time.perf_counter()
        load(f"bench/model-{i}")
        loads.append(time.perf_counter() - start)
    mg.uninstall()
    return {
        "raw_call_us": raw * 1e6,
        "guarded_call_us": guarded * 1e6,
        "guard_per_call_us": (guarded - raw) * 1e6,
        "decorator_per_call_us": (deco - raw) * 1e6,
        "guard_per_item_us": (guarded_item - raw_item) * 1e6,
        "load_policy_ms": statistics.median(loads) * 1e3,
    }


def bench_e2e(quick: bool) -> dict[str, float]:
    import mlx_lm

    from metal_guard import installer as mg
    from metal_guard.settings import get_settings
    from metal_guard.tinymodel import ensure_tiny_lm

    path = ensure_tiny_lm(get_settings().cache_file("bench-tiny-lm"))
    model, tok = mlx_lm.load(str(path))
    runs = 10 if quick else 30
    raw, guarded = [], []
    mlx_lm.generate(model, tok, prompt="warm up", max_tokens=32)
    for _ in range(runs):  # interleaved, so both see the same machine noise
        start = time.perf_counter()
        mlx_lm.generate(model, tok, prompt="the quick brown fox", max_tokens=32)
        raw.append(time.perf_counter() - start)
        mg.install(adapters=["mlx_lm"], cadence=False)
        start = time.perf_counter()
        mlx_lm.generate(model, tok, prompt="the quick brown fox", max_tokens=32)
        guarded.append(time.perf_counter() - start)
        mg.uninstall()
    r, g = statistics.median(raw), statistics.median(guarded)
    return {"raw_generate_ms": r * 1e3, "guarded_generate_ms": g * 1e3, "e2e_delta_ms": (g - r) * 1e3}


def _venv(base: Path, name: str, wheel: Path | None) -> Path:
    root = base / name
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(root)], check=True)  # type: ignore[attr-defined]
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    if wheel is not None:
        subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                        "--no-index", "-q", str(wheel)], check=True)
    (site / "zz_dev_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def bench_startup(quick: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(base / "dist")], check=True)
        wheel = next((base / "dist").glob("metal_guard-*.whl"))
        bare = _venv(base, "bare", None)
        ours = _venv(base, "ours", wheel)
        env = {k: v for k, v in os.environ.items() if not k.startswith("METALGUARD_")}
        env["METALGUARD_HOME"] = str(base / "home")
        on = dict(env, METALGUARD_AUTOLOAD="1")
        samples: dict[str, list[float]] = {"bare": [], "off": [], "on": []}
        for _ in range(20 if quick else 60):  # interleaved
            for key, python, e in (("bare", bare, env), ("off", ours, env), ("on", ours, on)):
                start = time.perf_counter()
                subprocess.run([str(python), "-c", "pass"], env=e, check=True, cwd=tmp)
                samples[key].append(time.perf_counter() - start)
        med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    return {"startup_bare_ms": med["bare"], "startup_autoload_off_ms": med["off"],
            "startup_autoload_on_ms": med["on"], "startup_on_over_bare_ms": med["on"] - med["bare"],
            "startup_off_over_bare_ms": med["off"] - med["bare"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("METALGUARD_HOME", tempfile.mkdtemp(prefix="mg-bench-"))
    import logging

    logging.getLogger("metal_guard").setLevel(logging.ERROR)  # "fit unknown" warnings per load
    results: dict[str, float] = {}
    results.update(bench_guards(args.quick))
    if not args.skip_e2e:
        results.update(bench_e2e(args.quick))
    if not args.skip_startup:
        results.update(bench_startup(args.quick))
    if args.json:
        print(json.dumps({k: round(v, 3) for k, v in results.items()}, indent=2))
        return
    goals = {"guard_per_call_us": 10.0, "guard_per_item_us": 2.0, "startup_on_over_bare_ms": 5.0}
    for key, value in results.items():
        unit = "us" if key.endswith("_us") else "ms"
        goal = goals.get(key)
        verdict = "" if goal is None else f"  (goal <= {goal:g} {unit}: {'PASS' if value <= goal else 'FAIL'})"
        print(f"{key:28s} {value:9.3f} {unit}{verdict}")


if __name__ == "__main__":
    main()
