"""The state of one guarded ``mlx_lm.server``: counters, readiness, requests in flight, idleness.

One :class:`ServerState` per ``ModelProvider`` (:func:`state_for`). The generation thread and the
HTTP threads both update it, always under ``state.lock``; nothing here touches MLX.

Readiness (``phase``):

``starting``  the start-up load is running: requests are queued (they are served once it is
              done), ``/health`` answers 503 ``loading``.
``waiting``   the start-up load waits for a policy (load cadence, panic cooldown, breaker):
              requests and ``/health`` are answered 503 + ``Retry-After`` at once.
``ready``     serving (a model may still be unloaded by the keep-alive; it is loaded again on
              the next request).
``gave_up``   the generation thread stopped for good: 503 until the process exits.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
import weakref
from typing import Any

log = logging.getLogger("metal_guard.adapters.mlx_lm_server")

#: Counters of a server: name -> help text (the metric is ``metal_guard_server_<name>``, with
#: ``_total`` appended when the name lacks it).
COUNTERS: dict[str, str] = {
    "requests_total": "Completion requests received.",
    "responses_503_total": "HTTP 503 answers sent by metal-guard (OOM before the first byte, "
                           "refused model switch, not ready, generation thread gone).",
    "stream_errors_total": "Error events metal-guard ended a 200 stream with (OOM mid-stream).",
    "model_not_found_total": "Requests for a model that could not be resolved (answered 404; "
                             "the served model untouched).",
    "oom_total": "Metal OOMs seen on the generation thread.",
    "oom_recoveries_total": "Times the batched generation loop was restarted after an OOM.",
    "model_loads_total": "Models loaded by ModelProvider (start-up and reloads included).",
    "model_switch_refused_total": "Model switches refused (cadence, fit, gate) before the "
                                  "served model was released.",
    "model_switch_failed_total": "Model switches that failed after the release; the previous "
                                 "model was loaded again.",
    "cadence_waits_total": "Start-up loads that waited for a policy (cadence, cooldown).",
    "idle_unloads": "Models unloaded by the keep-alive or under memory pressure while idle.",
}

PHASES = ("starting", "waiting", "ready", "gave_up")


class ServerState:
    """Counters and bookkeeping of one guarded server (one ``ModelProvider``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started_at = time.time()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.recoveries: collections.deque[float] = collections.deque()
        self.last_oom: dict[str, Any] | None = None
        self.generator: weakref.ref[Any] | None = None
        self.samplers_made = 0  # one per request served (test fault injection counts these)
        # readiness
        self.phase = "starting"
        self.reason: str | None = "loading"
        self.wait_until: float | None = None  # monotonic
        self.owns_process = False  # set when started through mlx_lm.server.run()
        self.supervised = False  # the generation thread started under metal-guard
        self.tracks_queue = False  # its request queue tracks requests (TrackingRequests)
        # requests in flight
        self._tracked: weakref.WeakSet[Any] = weakref.WeakSet()
        self.active_handlers = 0
        # keep-alive
        self.last_used = time.monotonic()
        self.request_keep_alive: float | None = None  # the last finished request's keep_alive
        self.next_pressure_check = 0.0
        self.pending_unload: tuple[str, str, float] | None = None  # (model, reason, idle_sec)
        self.idle_polls = 0  # times the generation loop found no request (keep-alive checks)
        self.pressure_runner: Any = None  # injectable macOS command runner (tests)
        # failed switches: model id -> (monotonic until, message)
        self.failed_switches: dict[str, tuple[float, str]] = {}

    # ------------------------------------------------------------------ counters

    def bump(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def note_oom(self, exc: BaseException, where: str) -> None:
        with self.lock:
            self.counters["oom_total"] += 1
            self.last_oom = {"at": time.time(), "where": where, "error": str(exc)[:300]}

    def may_recover(self, limit: int, window_sec: float, now: float | None = None) -> bool:
        """Record a recovery unless ``limit`` already happened within ``window_sec``."""
        now = time.monotonic() if now is None else now
        with self.lock:
            while self.recoveries and now - self.recoveries[0] > window_sec:
                self.recoveries.popleft()
            if len(self.recoveries) >= limit:
                return False
            self.recoveries.append(now)
            self.counters["oom_recoveries_total"] += 1
            return True

    # ------------------------------------------------------------------ readiness

    def set_phase(self, phase: str, reason: str | None = None, wait_sec: float | None = None) -> None:
        assert phase in PHASES, phase
        with self.lock:
            if self.phase == "gave_up":
                return  # final
            self.phase = phase
            self.reason = reason
            self.wait_until = time.monotonic() + max(0.0, wait_sec) if wait_sec is not None else None

    def not_ready(self) -> tuple[str, str, int | None] | None:
        """``(phase, reason, retry_after_sec)`` while not ready, else ``None``."""
        with self.lock:
            if self.phase == "ready" or not self.supervised:
                return None  # (a server started before install(): upstream's health decides)
            retry = None
            if self.wait_until is not None:
                retry = max(1, math.ceil(self.wait_until - time.monotonic()))
            elif self.phase == "starting":
                retry = 1
            return self.phase, self.reason or self.phase, retry

    @property
    def gave_up(self) -> bool:
        return self.phase == "gave_up"

    # ------------------------------------------------------------------ requests in flight

    def track(self, tracked: Any) -> None:
        """Remember a request queue the generation thread took (weakly)."""
        with self.lock:
            self._tracked.add(tracked)

    def live_requests(self) -> list[Any]:
        """Tracked request queues whose client is still waiting for an answer."""
        with self.lock:
            items = list(self._tracked)
        return [q for q in items if q.live]

    def begin_request(self) -> None:
        with self.lock:
            self.active_handlers += 1

    def end_request(self) -> None:
        """An HTTP handler is done writing its answer."""
        with self.lock:
            self.active_handlers = max(0, self.active_handlers - 1)
            self.last_used = time.monotonic()

    def request_finished(self, keep_alive: float | None) -> None:
        """The generation thread gave a request its last item (or its error): from now on that
        request's ``keep_alive`` (``None``: the setting) decides. Runs *before* the item reaches
        the handler, so a client that reads the status right after its answer sees it."""
        with self.lock:
            self.last_used = time.monotonic()
            self.request_keep_alive = keep_alive

    def mark_used(self) -> None:
        with self.lock:
            self.last_used = time.monotonic()

    # ------------------------------------------------------------------ failed switches

    def remember_failed_switch(self, model_id: str, message: str, for_sec: float) -> None:
        with self.lock:
            now = time.monotonic()
            self.failed_switches = {k: v for k, v in self.failed_switches.items() if v[0] > now}
            if len(self.failed_switches) < 64:
                self.failed_switches[model_id] = (now + for_sec, message[:300])

    def failed_switch(self, model_id: str) -> tuple[float, str] | None:
        """``(seconds left, message)`` while a failed switch to ``model_id`` is remembered."""
        with self.lock:
            entry = self.failed_switches.get(model_id)
            if entry is None:
                return None
            left = entry[0] - time.monotonic()
            if left <= 0:
                del self.failed_switches[model_id]
                return None
            return left, entry[1]


class TrackedQueue:
    """Stands in for a request's response queue: forwards every ``put`` and notes when the
    request got its last item (``None``) or an error.

    Created on the HTTP thread when the request is queued (:class:`TrackingRequests`), so it
    carries that request's ``keep_alive``; the server state is told the request finished
    *before* the last item is forwarded. With ``hold`` set (the sequential path), an error is
    kept back until :meth:`release` — after the adapter has cleaned up behind it — so the
    client never sees its 503 before the server is in the state the answer describes.
    """

    __slots__ = ("__weakref__", "ctx", "done", "failure", "held", "hold", "keep_alive", "queue",
                 "state")

    def __init__(self, queue: Any, state: ServerState | None = None,
                 keep_alive: float | None = None) -> None:
        self.queue = queue
        self.state = state
        self.keep_alive = keep_alive
        self.ctx: Any = None
        self.done = False
        self.failure: BaseException | None = None
        self.hold = False
        self.held: tuple[Any, tuple[Any, ...], dict[str, Any]] | None = None

    def put(self, item: Any, *args: Any, **kwargs: Any) -> None:
        if item is None or isinstance(item, BaseException):
            first = not self.done
            self.done = True
            if item is not None:
                self.failure = item
            if first and self.state is not None:
                self.state.request_finished(self.keep_alive)
            if item is not None and self.hold and self.held is None:
                self.held = (item, args, kwargs)
                return
        elif self.ctx is None and hasattr(item, "_should_stop"):
            self.ctx = item  # the GenerationContext; its stop() runs when the handler is done
        self.queue.put(item, *args, **kwargs)

    def release(self) -> None:
        """Forward an error kept back by ``hold`` (idempotent) and stop holding."""
        self.hold = False
        held, self.held = self.held, None
        if held is not None:
            item, args, kwargs = held
            self.queue.put(item, *args, **kwargs)

    @property
    def live(self) -> bool:
        """The client is still waiting: no last item, no error, handler not finished."""
        return not self.done and not bool(getattr(self.ctx, "_should_stop", False))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)


#: The HTTP thread's request being queued: its ``keep_alive`` (set by the handler wrapper).
request_local = threading.local()


def _wrap(item: Any, state: ServerState | None) -> Any:
    """``(response_queue, request, args)`` with the queue wrapped in a :class:`TrackedQueue`."""
    if not isinstance(item, tuple) or not item or isinstance(item[0], TrackedQueue):
        return item
    if not callable(getattr(item[0], "put", None)):
        return item
    keep_alive = getattr(request_local, "keep_alive", None)
    return (TrackedQueue(item[0], state, keep_alive), *item[1:])


class TrackingRequests(queue.Queue):  # type: ignore[type-arg]
    """``ResponseGenerator.requests`` once its generation thread runs under the supervisor (the
    instance's class is swapped, so every thread keeps using the same object).

    ``_put`` (HTTP thread, under the queue's mutex) wraps the response queue; ``_get``
    (generation thread) records it as held by the generation thread. Tracking therefore does
    not depend on any wrapper being active at the moment the request is taken: the supervisor,
    which answers tracked requests after an OOM, runs for the thread's whole life, and so does
    this.
    """

    _mg_state: ServerState | None

    def _put(self, item: Any) -> None:
        super()._put(_wrap(item, getattr(self, "_mg_state", None)))

    def _get(self) -> Any:
        item = _wrap(super()._get(), getattr(self, "_mg_state", None))
        state = getattr(self, "_mg_state", None)
        if state is not None and isinstance(item, tuple) and item and isinstance(item[0], TrackedQueue):
            state.track(item[0])
        return item


def reject_queued(generator: Any, make_error: Any) -> int:
    """Answer every request still waiting in ``generator.requests`` with ``make_error()`` (the
    generation thread cannot take them: a start-up wait, or it gave up). Returns how many."""
    requests = getattr(generator, "requests", None) if generator is not None else None
    answered = 0
    while requests is not None:
        try:
            item = requests.get_nowait()
        except queue.Empty:
            break
        except Exception as exc:
            log.debug("could not take a queued request: %s", exc)
            break
        target: Any = item[0] if isinstance(item, tuple) and item else None
        try:
            target.put(make_error())
            answered += 1
        except Exception as exc:
            log.debug("could not answer a queued request: %s", exc)
    return answered


def track_requests(generator: Any, state: ServerState) -> bool:
    """Make ``generator.requests`` a :class:`TrackingRequests` (``False`` if it is not a plain
    ``queue.Queue``: the ``_next_request`` wrapper then tracks what it hands out)."""
    requests = getattr(generator, "requests", None)
    if isinstance(requests, TrackingRequests):
        requests._mg_state = state
        return True
    if type(requests) is not queue.Queue:
        return False
    with requests.mutex:
        requests._mg_state = state  # type: ignore[attr-defined]
        requests.__class__ = TrackingRequests
        for index, item in enumerate(requests.queue):  # queued before the swap
            requests.queue[index] = _wrap(item, state)
    return True


_STATES: weakref.WeakKeyDictionary[Any, ServerState] = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def state_for(provider: Any) -> ServerState:
    """The state of the server that owns ``provider`` (a ``ModelProvider``), created on demand."""
    with _STATES_LOCK:
        state = _STATES.get(provider)
        if state is None:
            state = _STATES[provider] = ServerState()
        return state
