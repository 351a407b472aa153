"""What does resolving the settings cost, and what does it add to a breadcrumb write?

Measures in one run, remembered vs re-resolved:

1. ``get_settings()`` (the common call, remembered per raw value of the variables it reads)
   vs ``get_settings(env=os.environ)`` (the full parse and validation of every variable, which
   is what every call did before);
2. one breadcrumb write (``durable=False``, and the default ``durable=True`` with its fsync)
   with the normal ``get_settings`` vs with every call re-resolved and the platformdirs
   lookups not remembered, once with ``METALGUARD_HOME`` set and once with the platform
   directories (under a temporary ``HOME``).

Run:  python benchmarks/settings_cost.py [--calls 20000] [--writes 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any


def _per_call_us(fn: Callable[[], Any], calls: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean wall time per call, in microseconds."""
    per_round = max(1, calls // rounds)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_round):
            fn()
        samples.append((time.perf_counter() - start) / per_round * 1e6)
    return statistics.median(samples)


class _Forgetful(dict):  # type: ignore[type-arg]
    """A memo that never keeps anything (the platformdirs lookups as they were)."""

    def __setitem__(self, key: Any, value: Any) -> None:
        return None


@contextlib.contextmanager
def _re_resolved() -> Iterator[None]:
    """Every ``get_settings()`` parses the environment again, and platformdirs is asked
    every time: the cost as it was before the settings were remembered."""
    from metal_guard import settings as settings_mod

    original, memo = settings_mod.get_settings, settings_mod._platform_dirs

    def full(env: Any = None, **overrides: Any) -> Any:
        return original(os.environ if env is None else env, **overrides)

    settings_mod.get_settings = full  # type: ignore[assignment]
    settings_mod._platform_dirs = _Forgetful()
    try:
        yield
    finally:
        settings_mod.get_settings = original
        settings_mod._platform_dirs = memo


def _breadcrumb_us(writes: int, durable: bool) -> tuple[float, float]:
    from metal_guard.breadcrumbs import breadcrumb

    def write() -> None:
        breadcrumb("LOAD: some/model START", durable=durable)

    write()
    fast = _per_call_us(write, writes)
    with _re_resolved():
        slow = _per_call_us(write, writes)
    return fast, slow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000, help="get_settings calls per variant")
    parser.add_argument("--writes", type=int, default=2000, help="breadcrumbs per variant")
    args = parser.parse_args(argv)

    from metal_guard.settings import get_settings

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["METALGUARD_HOME"] = os.path.join(tmp, "mg")
        os.environ["MLX_FORCE_WAIT_SEC"] = "12"  # a few variables set, as in real use
        os.environ["METALGUARD_MODE"] = "defensive"
        print(f"python {sys.version.split()[0]}, {len(os.environ)} environment variables")
        remembered = _per_call_us(get_settings, args.calls)
        full = _per_call_us(lambda: get_settings(env=os.environ), args.calls // 10)
        print(f"get_settings(): {remembered:8.2f} us/call remembered, {full:8.2f} us/call "
              f"re-resolved  (x{full / remembered:.1f})")
        for label, home in (("METALGUARD_HOME set", True), ("platform dirs", False)):
            if home:
                os.environ["METALGUARD_HOME"] = os.path.join(tmp, "mg")
            else:
                os.environ.pop("METALGUARD_HOME", None)
                os.environ["HOME"] = os.path.join(tmp, "home")
                os.environ.pop("XDG_STATE_HOME", None)
                os.environ.pop("XDG_CACHE_HOME", None)
            for durable in (False, True):
                writes = args.writes if not durable else max(1, args.writes // 4)
                fast, slow = _breadcrumb_us(writes, durable)
                print(f"breadcrumb ({label}, durable={durable!s:5}): {fast:8.1f} us/write "
                      f"remembered, {slow:8.1f} us/write re-resolved  (x{slow / fast:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
