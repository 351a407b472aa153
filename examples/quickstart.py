"""Quickstart: protect an existing mlx_lm script with one call.

    python examples/quickstart.py [MODEL]

MODEL is a local model directory or a Hugging Face repo id (e.g.
``mlx-community/Qwen3-4B-4bit``). Without it, the tiny local model that ``metal-guard demo``
uses is built once (offline, ~0.4 MB, random weights: its text is noise) and used.
"""

from __future__ import annotations

import sys

import metal_guard

# One call, before or after importing mlx_lm. From now on mlx_lm.load is checked (panic
# cooldown, circuit breaker, known-panic models, fit, load cadence) and every generation is
# protected (a Metal OOM becomes a catchable metal_guard.MetalOOMError after a cache flush).
metal_guard.install()

import mlx_lm  # noqa: E402


def default_model() -> str:
    from metal_guard.tinymodel import default_dir, ensure_tiny_lm

    return str(ensure_tiny_lm(default_dir("lm")))


def main() -> int:
    model_path = sys.argv[1] if len(sys.argv) > 1 else default_model()
    try:
        model, tokenizer = mlx_lm.load(model_path)
    except metal_guard.CadenceViolation as exc:
        # Reloading a large model too soon is refused (a known kernel-panic trigger); the
        # interval scales with the model's size, so a small model never waits. The message says
        # when to retry and how to relax it.
        print(f"metal-guard refused the load: {exc}", file=sys.stderr)
        return 75  # EX_TEMPFAIL: try again later
    except metal_guard.MetalGuardError as exc:  # cooldown after a panic, does not fit, ...
        print(f"metal-guard refused the load: {exc}", file=sys.stderr)
        return 75

    try:
        text = mlx_lm.generate(model, tokenizer, prompt="Hello, Metal!", max_tokens=24)
    except metal_guard.MetalOOMError as exc:
        print(f"out of GPU memory, caches released: {exc}", file=sys.stderr)
        return 1
    print(text)

    adapters = metal_guard.adapter_report().adapters
    patched = [name for name, row in adapters.items() if row.state == "patched"]
    print(f"guarded by metal-guard: {', '.join(patched)} (other adapters activate when their "
          "library is imported)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
