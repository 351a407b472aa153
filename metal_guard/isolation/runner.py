"""L7 parent side: :class:`MLXSubprocessRunner`, one persistent worker process per model.

The worker (``python -m metal_guard.isolation.worker``) is started as a fresh interpreter —
fork + exec, the same thing multiprocessing's *spawn* start method does, never a bare fork
after MLX/Metal initialisation — in its own process group, with an inherited socket for the
framed protocol (:mod:`~metal_guard.isolation.protocol`) and its stdout/stderr/faulthandler
going to a per-worker log in ``<cache>/workers/``. Not using ``multiprocessing`` itself keeps
the caller's ``__main__`` from being re-imported in the worker.

What a caller gets:

* typed failures — a dead worker is a :class:`SubprocessCrashError` (signal, classifier
  verdict, the log tail); no frame for ``timeout`` seconds is a
  :class:`SubprocessTimeoutError` (the worker is killed; a generation that keeps producing
  tokens is never killed for wall time, but the prompt's prefill — time to the first token —
  is bounded by ``prefill_timeout``); an exception in the worker is a
  :class:`MetalOOMError` (OOM class) or :class:`WorkerError` carrying the worker traceback;
* respawn on the next call, after exponential backoff, a (bounded) wait for system memory
  to come back, and only when the circuit breaker and panic gate allow it;
* parent-side footprint enforcement (:class:`~metal_guard.isolation.supervisor.FootprintMonitor`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Generator, Iterator
from typing import Any

from metal_guard import testing
from metal_guard.errors import SubprocessCrashError, SubprocessTimeoutError, WorkerError
from metal_guard.isolation import protocol as P
from metal_guard.isolation import supervisor as S
from metal_guard.isolation.generation import SAMPLING_KEYS, normalize_backend
from metal_guard.isolation.lifecycle import WorkerLifecycle, positive, register, unregister
from metal_guard.isolation.spawn import WorkerHandle, process_alive

log = logging.getLogger("metal_guard.isolation.runner")

__all__ = ["MLXSubprocessRunner", "RunnerBusyError"]

DEFAULT_LOAD_TIMEOUT = 120.0
DEFAULT_GENERATE_TIMEOUT = 300.0
#: How long an abandoned request may take to wind down before its worker is replaced.
ABANDON_SEC = 5.0


class RunnerBusyError(SubprocessTimeoutError):
    """Another thread's request kept the runner busy for longer than this request's timeout.

    Nothing was sent and no worker was killed: the request never started.
    """

    def __init__(self, model_id: str, timeout: float, owner: int | None) -> None:
        super().__init__(model_id, timeout, "queue")
        self.args = (f"the worker for {model_id!r} stayed busy with another request (thread "
                     f"{owner}) for {timeout:.1f}s; this request was not sent",)


class MLXSubprocessRunner(WorkerLifecycle):
    """A model served by a dedicated worker process. Thread-safe; one request at a time.

    ``model_id_or_path`` is whatever ``mlx_lm.load`` / ``mlx_vlm.load`` accept. The worker is
    started at construction (``start=False`` defers it to the first call). ``load_timeout``
    bounds start-up (wall time); ``generate_timeout`` is the default *no-progress* timeout of
    a request; ``prefill_timeout`` bounds the wall time from sending a request to its first
    token (tokenisation and prompt prefill; default: the request's timeout).
    ``max_footprint_bytes`` overrides the hard footprint limit (default:
    ``METALGUARD_WORKER_MAX_FOOTPRINT_GB``, else the recommended GPU working set / the
    tier's critical share of RAM). ``use_lock`` holds the L8 GPU lock for the runner's life.
    ``env`` adds variables to the worker's environment.
    """

    def __init__(
        self,
        model_id_or_path: str | os.PathLike[str],
        *,
        backend: str = "mlx-lm",
        load_timeout: float = DEFAULT_LOAD_TIMEOUT,
        generate_timeout: float = DEFAULT_GENERATE_TIMEOUT,
        prefill_timeout: float | None = None,
        max_footprint_bytes: int | None = None,
        use_lock: bool = True,
        start: bool = True,
        env: dict[str, str] | None = None,
        load_kwargs: dict[str, Any] | None = None,
        heartbeat_interval_sec: float = 1.0,
        footprint_interval_sec: float = 0.5,
        backoff_base_sec: float = 0.25,
        backoff_max_sec: float = 30.0,
        memory_recovery_timeout_sec: float = 10.0,
    ) -> None:
        self.model_id = os.fspath(model_id_or_path)
        if not isinstance(self.model_id, str) or not self.model_id.strip():
            raise ValueError("model_id_or_path must be a non-empty string or path")
        self.backend = normalize_backend(backend)
        self.load_timeout = positive("load_timeout", load_timeout)
        self.generate_timeout = positive("generate_timeout", generate_timeout)
        self.prefill_timeout = (None if prefill_timeout is None
                                else positive("prefill_timeout", prefill_timeout))
        self.heartbeat_interval_sec = positive("heartbeat_interval_sec", heartbeat_interval_sec)
        self.footprint_interval_sec = positive("footprint_interval_sec", footprint_interval_sec)
        self.backoff_base_sec = float(backoff_base_sec)
        self.backoff_max_sec = float(backoff_max_sec)
        self.memory_recovery_timeout_sec = float(memory_recovery_timeout_sec)
        if max_footprint_bytes is not None and (isinstance(max_footprint_bytes, bool)
                                                or int(max_footprint_bytes) <= 0):
            raise ValueError("max_footprint_bytes must be a positive number of bytes or None")
        self._max_footprint_bytes = int(max_footprint_bytes) if max_footprint_bytes else None
        self._default_limit: int | None = None
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.load_kwargs = dict(load_kwargs or {})
        self.crash_count = 0
        self.respawn_count = 0
        self.last_result: dict[str, Any] | None = None
        self.last_error: BaseException | None = None
        self._handle = WorkerHandle()
        self._state = threading.RLock()
        self._request_lock = threading.Lock()
        self._request_owner: int | None = None
        self._ids = itertools.count(1)
        self._closed = False
        self._spawned = False
        self._failures = 0
        self._last_failure_at: float | None = None
        self._baseline_available: int | None = None
        self._stop_reason: str | None = None
        self._lock_path: str | None = None
        self._clock = time.monotonic
        self._sleep = time.sleep
        self._finalizer = weakref.finalize(self, WorkerHandle.reap, self._handle)
        register(self)
        if use_lock:
            self._acquire_gpu_lock()
        if start:
            try:
                with self._state:
                    self._spawn()
            except BaseException:
                self._closed = True
                self._release_gpu_lock()
                raise

    # ------------------------------------------------------------------ public API

    @property
    def worker_pid(self) -> int | None:
        """Pid of the live worker, or ``None``."""
        proc = self._handle.proc
        return proc.pid if proc is not None and process_alive(proc) else None

    @property
    def ready_info(self) -> dict[str, Any] | None:
        """The worker's ``ready`` frame (pid, create_time, load_sec, device, ...)."""
        return dict(self._handle.ready) if self._handle.ready else None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def max_footprint_bytes(self) -> int | None:
        """The hard footprint limit the parent enforces (``None``: not enforced)."""
        if self._max_footprint_bytes:
            return self._max_footprint_bytes
        from metal_guard.settings import get_settings

        gb = get_settings().worker_max_footprint_gb
        if gb:
            return int(gb * 1e9)
        if self._default_limit is None:  # probed once: the hardware does not change
            self._default_limit = S.default_footprint_limit(self._handle.ready) or 0
        return self._default_limit or None

    @max_footprint_bytes.setter
    def max_footprint_bytes(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or int(value) <= 0):
            raise ValueError("max_footprint_bytes must be a positive number of bytes or None")
        self._max_footprint_bytes = int(value) if value else None

    def is_alive(self) -> bool:
        """True when a worker process is running and has reported ready."""
        proc = self._handle.proc
        return proc is not None and process_alive(proc) and self._handle.ready is not None

    def footprint_bytes(self) -> int | None:
        """The worker's current footprint (process tree, bytes), measured from the parent."""
        pid = self.worker_pid
        return S.process_tree_footprint_bytes(pid) if pid else None

    def generate(self, prompt: str | list[dict[str, Any]], *, max_tokens: int = 256,
                 temperature: float = 0.0, top_p: float | None = None,
                 system: str | None = None, timeout: float | None = None,
                 seed: int | None = None, image: Any = None, apply_chat_template: bool = True,
                 extra: dict[str, Any] | None = None, prefill_timeout: float | None = None,
                 **sampling: Any) -> str:
        """Generate in the worker and return the text.

        ``timeout`` (default ``generate_timeout``) is the longest the worker may go without
        producing a token or a prefill chunk; ``prefill_timeout`` (default: the runner's, else
        ``timeout``) the longest it may take to produce the first token. A request larger
        than the protocol's frame limit raises ``ValueError`` before anything is sent; a
        prompt whose estimated prefill peak passes the R4 ceiling is refused by the worker
        (:class:`MetalOOMError`, the worker stays loaded). Other sampling arguments: ``top_k``, ``min_p``,
        ``min_tokens_to_keep``, ``xtc_probability``, ``xtc_threshold``, ``repetition_penalty``,
        ``repetition_context_size``, ``presence_penalty``, ``frequency_penalty``,
        ``logit_bias``. ``extra`` is passed to the library's ``stream_generate``.
        """
        req, wait = self._request(prompt, max_tokens, temperature, top_p, system, timeout, seed,
                                  image, apply_chat_template, extra, sampling)
        prefill = self._prefill_wait(prefill_timeout, wait)
        with contextlib.closing(self._exchange(req, wait, prefill)) as frames:
            return "".join(fr["text"] for fr in frames)

    def stream_generate(self, prompt: str | list[dict[str, Any]], *, max_tokens: int = 256,
                        temperature: float = 0.0, top_p: float | None = None,
                        system: str | None = None, timeout: float | None = None,
                        seed: int | None = None, image: Any = None,
                        apply_chat_template: bool = True, extra: dict[str, Any] | None = None,
                        prefill_timeout: float | None = None,
                        **sampling: Any) -> Iterator[str]:
        """Like :meth:`generate`, yielding text chunks as the worker produces them.

        Arguments are checked now; the request starts at the first ``next()``. Closing the
        iterator early stops the generation in the worker, which stays loaded.
        """
        req, wait = self._request(prompt, max_tokens, temperature, top_p, system, timeout, seed,
                                  image, apply_chat_template, extra, sampling)
        return self._stream(req, wait, self._prefill_wait(prefill_timeout, wait))

    def stats(self) -> dict[str, Any]:
        """Parent-side facts plus, when the worker is idle, its MLX counters (bytes)."""
        monitor = self._handle.monitor
        out: dict[str, Any] = {
            "model_id": self.model_id, "backend": self.backend, "pid": self.worker_pid,
            "alive": self.is_alive(), "crash_count": self.crash_count,
            "respawn_count": self.respawn_count, "footprint_bytes": self.footprint_bytes(),
            "peak_footprint_bytes": monitor.peak_bytes if monitor else None,
            "max_footprint_bytes": self.max_footprint_bytes, "last_result": self.last_result,
        }
        if self.is_alive() and self._request_lock.acquire(blocking=False):
            try:
                proc, chan = self._handle.proc, self._handle.chan
                if proc is not None and chan is not None:
                    chan.send(P.frame(P.STATS))
                    for _ in range(8):  # skip late frames of an abandoned request
                        fr = self._next_frame(proc, chan, 5.0, phase="stats", timeout=5.0)
                        if fr["type"] == P.STATS:
                            out["worker"] = {k: v for k, v in fr.items()
                                             if k not in ("v", "type")}
                            break
            except (OSError, WorkerError, SubprocessCrashError, SubprocessTimeoutError) as exc:
                out["worker_error"] = str(exc)
            finally:
                self._request_lock.release()
        return out

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit (then SIGTERM, then SIGKILL its group); release the GPU lock."""
        self._closed = True  # no lock: a spawn in progress must not delay the shutdown
        proc, chan = self._handle.proc, self._handle.chan
        if proc is not None and process_alive(proc):
            if chan is not None:
                with contextlib.suppress(OSError, ValueError):
                    chan.send(P.frame(P.SHUTDOWN), timeout=min(timeout, 2.0))
            # a worker blocked writing tokens to an open, unread stream cannot read the
            # shutdown frame: do not wait the full timeout for it
            busy = self._request_owner is not None
            WorkerHandle.stop_process(proc, grace_sec=min(timeout, 2.0) if busy else timeout)
        self._discard_if_idle(proc)
        self._release_gpu_lock()
        unregister(self)

    def kill(self) -> None:
        """SIGKILL the worker's process group at once; the runner is closed afterwards."""
        self._closed = True
        proc = self._handle.proc
        if proc is not None:
            WorkerHandle.stop_process(proc, grace_sec=0.0)
        self._discard_if_idle(proc)
        self._release_gpu_lock()
        unregister(self)

    def __enter__(self) -> MLXSubprocessRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("alive" if self.is_alive() else "idle")
        return (f"MLXSubprocessRunner({self.model_id!r}, backend={self.backend!r}, "
                f"pid={self.worker_pid}, {state})")

    # ------------------------------------------------------------------ requests

    def _request(self, prompt: Any, max_tokens: int, temperature: float, top_p: float | None,
                 system: str | None, timeout: float | None, seed: int | None, image: Any,
                 apply_chat_template: bool, extra: dict[str, Any] | None,
                 sampling: dict[str, Any]) -> tuple[dict[str, Any], float]:
        wait = self.generate_timeout if timeout is None else positive("timeout", timeout)
        debug_delay = testing.token_delay(sampling)
        req = P.generate_request(
            prompt, backend=self.backend, max_tokens=max_tokens, temperature=temperature,
            system=system, seed=seed, images=image, apply_chat_template=apply_chat_template,
            extra=extra, sampling={"top_p": top_p, **sampling}, sampling_keys=SAMPLING_KEYS)
        if debug_delay:
            req["debug_token_delay_sec"] = float(debug_delay)
        return req, wait

    def _prefill_wait(self, prefill_timeout: float | None, wait: float) -> float:
        if prefill_timeout is not None:
            return positive("prefill_timeout", prefill_timeout)
        return self.prefill_timeout if self.prefill_timeout is not None else wait

    def _stream(self, req: dict[str, Any], wait: float, prefill: float) -> Iterator[str]:
        with contextlib.closing(self._exchange(req, wait, prefill)) as frames:
            for fr in frames:
                if fr["text"]:
                    yield fr["text"]

    def _enter_request(self, wait: float) -> None:
        """Take the runner for one request, waiting at most ``wait`` seconds for another
        thread's request (an unfinished stream it never closes must not block us forever)."""
        me = threading.get_ident()
        if self._request_owner == me:
            raise RuntimeError(
                f"a request to the worker for {self.model_id!r} is still open in this thread "
                "(an unfinished stream_generate?); exhaust or close() it first")
        if not self._request_lock.acquire(timeout=wait):
            raise RunnerBusyError(self.model_id, wait, self._request_owner)
        self._request_owner = me

    def _exit_request(self) -> None:
        self._request_owner = None
        self._request_lock.release()
        if self._closed:
            self._discard_if_idle(self._handle.proc)

    def _exchange(self, request: dict[str, Any], wait: float,
                  prefill: float | None) -> Generator[dict[str, Any], None, None]:
        """Send one request and yield its token frames; the ``done`` frame ends it.

        Every wait is bounded: the send by ``wait`` (the worker must take the request), each
        frame by ``wait`` of no progress, and the first token by ``prefill`` seconds of wall
        time (``None``: no separate bound).
        """
        self._enter_request(wait)
        try:
            proc, chan = self._ensure_worker()
            rid = next(self._ids)
            request = {**request, "id": rid}
            self._stop_reason = None
            self._handle.kill_reason = None
            self._handle.in_generation = True
            self._handle.current_id = rid
            finished = False
            try:
                sent_at = self._clock()
                try:
                    chan.send(request, timeout=wait)
                except P.FrameTooLarge as exc:
                    raise ValueError(str(exc)) from None
                except TimeoutError:
                    raise self._on_timeout(proc, "send", wait) from None
                except (OSError, ValueError):
                    raise self._on_death(proc, "generate") from None
                prefill_end = None if prefill is None else sent_at + prefill
                # "tokenize" until the worker reports the prefill's start (template and
                # tokenisation run on the CPU: a stall there is not a GPU hang), then
                # "prefill" until the first token, then "generate".
                phase = "tokenize" if request.get("type") == P.GENERATE else "generate"
                progressed = False  # no frame yet: a timeout now is plain "no progress"
                while True:
                    step, message = wait, None
                    if prefill_end is not None:
                        left = prefill_end - self._clock()
                        if left < wait:
                            step = max(left, 0.0)
                            if progressed:
                                message = (f"worker for {self.model_id!r} did not finish the "
                                           f"prompt prefill within {prefill:.1f}s "
                                           "(prefill_timeout); killed")
                    fr = self._next_frame(proc, chan, step, phase=phase, timeout=wait,
                                          message=message)
                    if fr.get("id") not in (rid, None):
                        continue  # a late frame of an earlier, abandoned request
                    progressed = True
                    kind = fr["type"]
                    if kind == P.TOKEN:
                        prefill_end = None
                        phase = "generate"
                        yield fr
                    elif kind == P.HEARTBEAT and phase == "tokenize" and \
                            fr.get("phase") == "prefill":
                        phase = "prefill"
                    elif kind == P.DONE:
                        finished = True
                        self._failures = 0
                        self.last_result = {k: v for k, v in fr.items() if k not in ("v", "type")}
                        return
                    elif kind == P.ERROR:
                        finished = True
                        raise self._worker_error(proc, fr)
            finally:
                self._handle.in_generation = False
                self._handle.current_id = None
                if not finished and process_alive(proc) and self._handle.proc is proc:
                    self._abandon(proc, chan, rid)
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit):
                self.last_error = exc
            raise
        finally:
            self._exit_request()

    def _abandon(self, proc: Any, chan: P.Channel, rid: int) -> None:
        """The caller left mid-request: stop it in the worker, or replace the worker."""
        deadline = self._clock() + max(ABANDON_SEC, 3 * self.heartbeat_interval_sec)
        try:
            chan.send(P.frame(P.STOP, id=rid, reason="request abandoned by the caller"),
                      timeout=max(ABANDON_SEC, 3 * self.heartbeat_interval_sec))
            while self._clock() < deadline and process_alive(proc):
                if chan.poll(0.1):
                    fr = chan.recv()
                    if fr.get("id") == rid and fr["type"] in (P.DONE, P.ERROR):
                        return
        except (OSError, EOFError, WorkerError):
            pass
        log.warning("worker for %r did not wind down an abandoned request; replacing it",
                    self.model_id)
        self._retire(proc)
