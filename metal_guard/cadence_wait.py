"""The cadence step of a guarded load: rank-aware, and a visible countdown where a person waits.

In a terminal (stdin and stderr are TTYs) or a notebook kernel, a cadence wait of at most
``METALGUARD_CADENCE_INTERACTIVE_WAIT_SEC`` (default 30 s) is shown as a countdown on stderr
and the load then proceeds; a longer wait, a script without a terminal, a server or observer
mode gets the :class:`~metal_guard.errors.CadenceViolation` as before (observer mode records
it and lets the load through). Ctrl-C during the countdown stops it (``KeyboardInterrupt``).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from metal_guard.breadcrumbs import breadcrumb_with_meta as _crumb
from metal_guard.errors import CadenceViolation
from metal_guard.settings import Settings, get_settings

log = logging.getLogger("metal_guard.cadence")

__all__ = ["clear_or_wait", "is_interactive"]

#: At most this many countdowns per load (another process may load in between).
MAX_WAITS = 3


def is_interactive() -> bool:
    """A person is watching: a notebook kernel, or a terminal on both stdin and stderr."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return bool(sys.stdin and sys.stdin.isatty() and sys.stderr and sys.stderr.isatty())
    except (ValueError, OSError):  # closed or detached streams
        return False


def _countdown(exc: CadenceViolation, stream: IO[str], sleep: Callable[[float], Any]) -> float:
    total = max(0.0, float(exc.remaining_sec))
    model = exc.model_id[:80]
    why = f" ({exc.reason})" if exc.reason else ""
    stream.write(f"metal-guard: {model!r} was loaded {exc.delta:.0f}s ago; cadence wait "
                 f"{math.ceil(total)}s before loading it{why}. Ctrl-C to stop.\n")
    left = total
    while left > 0:
        stream.write(f"\rmetal-guard: loading {model!r} in {math.ceil(left):3d}s ")
        stream.flush()
        step = min(1.0, left)
        sleep(step)
        left -= step
    stream.write(f"\rmetal-guard: loading {model!r} now{' ' * 8}\n")
    stream.flush()
    return total


def clear_or_wait(
    model_id: str, *, model_path: str | None = None, settings: Settings | None = None,
    interactive: bool | None = None, stream: IO[str] | None = None,
    sleep: Callable[[float], Any] = time.sleep, now: Callable[[], float] | None = None,
) -> float:
    """Check and record the load (:meth:`CadenceGuard.require_clear`, with this process's
    rank); in an interactive session wait out a short refusal with a countdown. Returns the
    recorded load time."""
    from metal_guard import distributed
    from metal_guard.cadence import CadenceGuard

    settings = settings or get_settings()
    guard = CadenceGuard(settings=settings, clock=now)
    rank = distributed.current(settings)
    limit = settings.cadence_interactive_wait_sec
    for attempt in range(MAX_WAITS + 1):
        try:
            return guard.require_clear(model_id, model_path=model_path, rank=rank)
        except CadenceViolation as exc:
            can_wait = (settings.is_defensive and attempt < MAX_WAITS and limit > 0
                        and exc.remaining_sec <= limit
                        and (is_interactive() if interactive is None else interactive))
            if not can_wait:
                raise
            _crumb("CADENCE_WAIT", model_id[:200], wait_sec=f"{exc.remaining_sec:.1f}",
                   last_pid=exc.last_pid or "-")
            log.info("cadence: waiting %.1fs before loading %s", exc.remaining_sec, model_id)
            _countdown(exc, stream or sys.stderr, sleep)
    raise AssertionError("unreachable")  # pragma: no cover
