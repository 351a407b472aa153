"""Test-only faults a worker can be asked to commit (``_debug_fault`` frames).

The worker runs these only when it was started with ``METALGUARD_WORKER_TEST_FAULTS=1`` and
``METALGUARD_TESTING=1`` (see :mod:`metal_guard.testing`, which sends them);
otherwise a ``_debug_fault`` request is answered with a ``PermissionError``. They exist so
the test suite and the benchmarks can produce *real* crashes in a real worker:

* ``abort``          — ``os.abort()``: SIGABRT, like an uncaught C++ exception in Metal.
* ``huge_alloc``     — evaluate a 1 TiB ``mx.zeros`` (a SIGSEGV on the CPU build).
* ``exit``           — ``os._exit(code)``.
* ``raise``          — raise ``RuntimeError(message)`` (e.g. an MLX error string).
* ``bad_frame``      — write a raw frame header announcing ``size`` bytes (default 100 MiB,
  over the protocol limit) followed by ``junk`` bytes, as a broken or hostile worker would.
* ``alloc``          — allocate ``chunk_bytes`` every ``interval_sec`` up to ``total_bytes``
  with real MLX arrays, then hold for ``hold_sec``; honours ``stop`` unless
  ``ignore_stop``; ``ignore_sigterm`` makes SIGTERM ineffective (to exercise SIGKILL).

``load_kwargs={"_debug_fault": "abort"}`` commits a fault while the model loads (before MLX
is imported), which makes crash-during-load cheap to test.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

__all__ = ["FAULT_KINDS", "run_fault"]

FAULT_KINDS = ("abort", "huge_alloc", "exit", "raise", "bad_frame", "alloc")
TIB = 1 << 40


def run_fault(worker: Any, req: dict[str, Any]) -> dict[str, Any]:
    kind = req.get("kind")
    if kind == "abort":
        os.abort()
    if kind == "exit":
        os._exit(int(req.get("code", 1)))
    if kind == "raise":
        raise RuntimeError(str(req.get("message") or "debug fault"))
    if kind == "bad_frame":
        return _bad_frame(worker, req)
    from metal_guard import backend

    mx = backend.core()
    if mx is None:
        raise RuntimeError("MLX is not available in this worker")
    if kind == "huge_alloc":
        side = 1 << 20  # (2**20)**2 bytes = 1 TiB of uint8
        mx.eval(mx.zeros((side, side), dtype=mx.uint8))
        return {"allocated_bytes": TIB}  # not reached on the CPU build
    if kind == "alloc":
        return _alloc(worker, mx, req)
    raise ValueError(f"unknown debug fault {kind!r}; known: {', '.join(FAULT_KINDS)}")


def _alloc(worker: Any, mx: Any, req: dict[str, Any]) -> dict[str, Any]:
    chunk = max(1, int(req.get("chunk_bytes", 32 << 20)))
    total = max(chunk, int(req.get("total_bytes", 256 << 20)))
    interval = float(req.get("interval_sec", 0.05))
    hold = float(req.get("hold_sec", 0.0))
    honour_stop = not req.get("ignore_stop")
    if req.get("ignore_sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    held: list[Any] = []
    allocated = 0
    try:
        while allocated < total:
            arr = mx.ones((chunk,), dtype=mx.uint8)
            mx.eval(arr)
            held.append(arr)
            allocated += chunk
            if honour_stop:
                worker.check_interrupt()
            time.sleep(interval)
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline:
            if honour_stop:
                worker.check_interrupt()
            time.sleep(0.02)
    finally:
        held.clear()
        from metal_guard import backend

        backend.clear_cache(load=False)
    return {"allocated_bytes": allocated}


def _bad_frame(worker: Any, req: dict[str, Any]) -> dict[str, Any]:
    import struct

    size = int(req.get("size", 100 << 20))
    junk = int(req.get("junk", 1 << 20))
    chan = worker.channel
    with chan._send_lock:  # never in the middle of another thread's frame
        chan.sock.sendall(struct.pack("!I", size) + b"\x00" * junk)
    return {"bad_frame_bytes": size}
