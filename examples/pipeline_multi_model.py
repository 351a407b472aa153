"""A two-model pipeline: a drafter in this process, a reviewer in an isolated worker.

    python examples/pipeline_multi_model.py [DRAFTER] [REVIEWER]

The drafter is loaded here with every load check; the reviewer runs in its own worker process
(``metal_guard.isolation.isolated_model``), so a Metal abort or a runaway footprint in the
reviewer kills the worker, not the pipeline: the worker is respawned on the next call. Without
arguments both models are the tiny local ones ``metal-guard demo`` builds (offline).
"""

from __future__ import annotations

import sys

import metal_guard
from metal_guard.isolation import isolated_model

metal_guard.install()

import mlx_lm  # noqa: E402


def default_models() -> tuple[str, str]:
    from metal_guard.demo import demo_models
    from metal_guard.tinymodel import ensure_tiny_lm

    paths = demo_models()
    return (str(ensure_tiny_lm(paths["drafter"], seed=0)),
            str(ensure_tiny_lm(paths["reviewer"], seed=1)))


def review_in_worker(reviewer, text: str) -> str:
    for attempt in (1, 2):
        try:
            return reviewer.generate(f"Review this draft: {text}", max_tokens=16, temperature=0.0)
        except metal_guard.SubprocessCrashError as crash:
            # The worker died (crash.error_class says how); the next call respawns it.
            print(f"reviewer worker crashed ({crash}); attempt {attempt} of 2", file=sys.stderr)
    raise RuntimeError("the reviewer kept crashing")


def main() -> int:
    drafter_path, reviewer_path = default_models()
    if len(sys.argv) > 1:
        drafter_path = sys.argv[1]
    if len(sys.argv) > 2:
        reviewer_path = sys.argv[2]

    try:
        drafter, tokenizer = mlx_lm.load(drafter_path)
    except metal_guard.MetalGuardError as exc:
        print(f"metal-guard refused the load: {exc}", file=sys.stderr)
        return 75

    draft = mlx_lm.generate(drafter, tokenizer, prompt="Draft a haiku about GPUs.", max_tokens=16)
    print(f"draft:    {draft!r}")
    with isolated_model(reviewer_path) as reviewer:
        review = review_in_worker(reviewer, draft)
        print(f"review:   {review!r}  (worker pid {reviewer.worker_pid})")
    final = mlx_lm.generate(drafter, tokenizer, prompt=f"Revise using: {review}", max_tokens=16)
    print(f"revision: {final!r}")

    snapshot = metal_guard.get_status_snapshot(breadcrumb_lines=6)
    print("last breadcrumbs:")
    for line in snapshot["breadcrumb_tail"]:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
