"""The ``mlx_lm.server`` adapter's OOM recovery and giving up, in the generation thread.

After a Metal OOM in the batched generation loop, :func:`recover` releases memory and writes
the record *before* the requests in flight get their 503, so a client that retries finds the
memory freed and the breadcrumb written. When the loop cannot go on (too many recoveries, or
another failure), :func:`give_up` marks the server not ready, answers every request in flight
and queued, and — when this process is the server (``mlx_lm.server.run``) — exits with
:data:`EXIT_SERVER_GAVE_UP` once the answers are out, so a supervisor restarts it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from typing import Any

from metal_guard.adapters import _server_http as http
from metal_guard.adapters import _server_switch as switch
from metal_guard.adapters._server_state import ServerState, reject_queued
from metal_guard.breadcrumbs import breadcrumb_with_meta as _crumb

log = logging.getLogger("metal_guard.adapters.mlx_lm_server")  # the adapter's messages, one logger

#: Exit code of a server process that gave up (generation can no longer make progress): a
#: supervisor (launchd ``KeepAlive``/``SuccessfulExit=false``, systemd ``Restart=on-failure``)
#: restarts it. Same value as ``metal_guard.cli.EXIT_SERVER_GAVE_UP`` (EX_UNAVAILABLE).
EXIT_SERVER_GAVE_UP = 69
#: After giving up: how long in-flight answers may take before the process exits anyway.
EXIT_DRAIN_SEC = 10.0
EXIT_GRACE_SEC = 5.0


def _public_error(exc: BaseException) -> BaseException:
    """A traceback-free OOM error for the waiting requests (the original's frames hold the
    dead batch's KV caches)."""
    from metal_guard.errors import MetalOOMError

    return MetalOOMError(f"Metal OOM while generating; the request was dropped and memory released: "
                         f"{str(exc)[:300]}",
                         error_class=getattr(exc, "error_class", None))


def _fail(queues: list[Any], error: BaseException) -> int:
    answered = 0
    for queue in queues:
        try:
            queue.put(error)
            answered += 1
        except Exception as err:
            log.debug("could not fail a request: %s", err)
    return answered


def recover(generator: Any, state: ServerState, exc: BaseException) -> None:
    """After an OOM in the batched loop: release memory, write the record, *then* answer the
    requests in flight — a client that got its 503 finds the breadcrumb, the counters and the
    freed memory already there (and its retry does not race the release)."""
    live = state.live_requests()  # strong references, before the dead frames are cleared
    error = _public_error(exc)
    if exc.__traceback__ is not None:
        traceback.clear_frames(exc.__traceback__)
    switch.drop_prompt_cache(generator)
    switch.release_memory()
    _crumb("SERVER_OOM_RECOVERED", str(exc)[:200], answered_503=len(live))
    answered = _fail(live, error)
    log.warning("mlx_lm.server: Metal OOM in the batched generation loop; %d request(s) in "
                "flight answered 503, memory released, generation loop restarted", answered)


def give_up(generator: Any, state: ServerState, exc: BaseException, why: str) -> None:
    """The generation thread stops for good: not ready, in-flight requests answered, and — when
    this process is the server (``mlx_lm.server.run``) — exit with :data:`EXIT_SERVER_GAVE_UP`."""
    with state.lock:
        state.phase, state.reason, state.wait_until = "gave_up", "generation_unavailable", None
    error = _public_error(exc) if http.is_oom(exc) else RuntimeError("generation thread died")
    live = state.live_requests()
    exits = state.owns_process
    _crumb("SERVER_GAVE_UP", why[:200], answered_503=len(live),
           exit_code=EXIT_SERVER_GAVE_UP if exits else "-")
    log.error("mlx_lm.server: %s; the generation thread stops (%d request(s) in flight answered "
              "503)%s", why, len(live),
              f"; the process exits with code {EXIT_SERVER_GAVE_UP} so a supervisor restarts it"
              if exits else "")
    _fail(live, error)
    # queued, never taken: answered now rather than when the handler notices the dead thread
    reject_queued(generator, lambda: http.NotReady(
        "generation_unavailable", http.UNAVAILABLE_RETRY_AFTER_SEC, "gave_up"))
    if exits:
        threading.Thread(target=_exit_when_drained, args=(generator, state),
                         name="metal-guard-server-exit", daemon=True).start()


def _exit_when_drained(generator: Any, state: ServerState) -> None:
    import _thread as low

    try:
        generator.join()
    except Exception as exc:
        log.debug("join of the generation thread failed: %s", exc)
    deadline = time.monotonic() + EXIT_DRAIN_SEC
    while state.active_handlers and time.monotonic() < deadline:
        time.sleep(0.05)
    log.error("mlx_lm.server: exiting with code %d (gave up)", EXIT_SERVER_GAVE_UP)
    low.interrupt_main()  # serve_forever returns; the ``run`` wrapper exits with the code
    time.sleep(EXIT_GRACE_SEC)
    for stream in (sys.stdout, sys.stderr):  # SIGINT ignored (e.g. started with ``&``): hard exit
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(EXIT_SERVER_GAVE_UP)
