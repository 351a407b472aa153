"""An agent loop: many short generations with one loaded model, guarded.

    python examples/agent_loop.py [MODEL] [--steps N]

Long-running loops of short calls are where MLX's buffer cache and Metal's resource counters
creep up. ``@metal_guard.guarded_generate(flush_every_n=...)`` puts each step under the
generation guard: OOM protection (a Metal OOM becomes ``MetalOOMError`` after a cache flush),
inference counting for the cold-restart advice, and a cache flush every N calls. The
``mlx_lm.generate`` call inside is guarded once, not twice.
"""

from __future__ import annotations

import argparse
import sys

import metal_guard

metal_guard.install()

import mlx_lm  # noqa: E402


def default_model() -> str:
    from metal_guard.tinymodel import default_dir, ensure_tiny_lm

    return str(ensure_tiny_lm(default_dir("lm")))


@metal_guard.guarded_generate(flush_every_n=10)
def agent_step(model, tokenizer, observation: str) -> str:
    prompt = f"Observation: {observation}\nNext action:"
    return mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model path or repo (default: the demo's tiny model)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    try:
        model, tokenizer = mlx_lm.load(args.model or default_model())
    except metal_guard.MetalGuardError as exc:
        print(f"metal-guard refused the load: {exc}", file=sys.stderr)
        return 75

    tracker = metal_guard.global_resource_tracker()
    start = tracker.count
    observation = "the door is closed"
    for step in range(args.steps):
        try:
            action = agent_step(model, tokenizer, observation)
        except metal_guard.MetalOOMError as exc:
            print(f"step {step}: out of GPU memory ({exc}); caches were flushed, retrying smaller")
            continue
        observation = f"step {step}: {action.strip()[:40]}"

    done = tracker.count - start
    print(f"{done} guarded generations, {tracker.count} in this process")
    if tracker.should_cold_restart():
        print("metal-guard advises a cold restart of this process (resource counters are high)")
    print(metal_guard.memory_stats().describe())
    return 0 if done == args.steps else 1


if __name__ == "__main__":
    sys.exit(main())
