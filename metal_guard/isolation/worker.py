"""The isolated worker process (L7 child side): ``python -m metal_guard.isolation.worker``.

The parent starts this module in a fresh interpreter (fork + exec, like multiprocessing's
*spawn* start method, never a bare fork after MLX/Metal initialisation), in its own process
group, with stdout/stderr redirected to a per-worker log file that also receives the
``faulthandler`` dump. One worker serves one model:

1. set ``METALGUARD_SUBPROCESS_WORKER=1`` and ``TOKENIZERS_PARALLELISM=false``;
2. start a watcher thread: exits at once when the parent dies (re-parenting or a broken
   pipe) and sends ``heartbeat`` frames during model load whenever the worker has been quiet
   for the heartbeat interval. Prompt prefill reports progress only when a prefill chunk
   really finished, and decoding by tokens: a prefill or decode step that stalls longer than
   the parent's timeout is a hang, and the parent treats it as one;
3. load the model with ``mlx_lm.load`` or ``mlx_vlm.load`` and send ``ready``;
4. serve ``generate`` requests: chat template when the tokenizer has one, the R4 prefill
   guard on the tokenised prompt (:func:`metal_guard.prefill.require_prefill_fit`, before any
   prefill allocation), every sampling argument, optional seed, tokens streamed one frame
   per step, each generation wrapped in
   :func:`~metal_guard.isolation.helpers.subprocess_inference_guard` and preceded by
   :func:`~metal_guard.isolation.helpers.gemma4_generation_flush`.

All MLX work runs on the main thread (MLX streams are thread-affine); the watcher thread
never touches MLX. Test-only faults (``_debug_fault`` frames) run only when the worker's
environment has ``METALGUARD_WORKER_TEST_FAULTS=1`` and ``METALGUARD_TESTING=1``.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

from metal_guard.isolation import protocol as P
from metal_guard.isolation.generation import GenerationStopped, Model
from metal_guard.threads import clearing_streams

log = logging.getLogger("metal_guard.isolation.worker")

__all__ = ["EXIT_LOAD_FAILED", "EXIT_PARENT_GONE", "WorkerConfig", "main"]

EXIT_LOAD_FAILED = 2
EXIT_PARENT_GONE = 3
WATCH_INTERVAL_SEC = 0.1
#: Token frames are sent at most this often: a step that comes sooner after the last frame
#: rides with the next one. Streams slower than ~500 tokens/s get one frame per token; faster
#: ones share frames, which keeps the parent from waking (and competing for the CPU) per token.
TOKEN_COALESCE_SEC = 0.002
#: Phases in which the watcher thread sends heartbeats (see :meth:`Worker.watch`). Not
#: prefill: a heartbeat from a side thread says nothing about the main thread's progress.
HEARTBEAT_PHASES = frozenset({"load"})
#: Longest ``message`` / ``traceback`` an error frame carries (an exception text may quote
#: the whole prompt; the frame must stay far below the protocol limit).
ERROR_TEXT_MAX_CHARS = 64 * 1024


@dataclass
class WorkerConfig:
    """What the parent tells a worker at start (passed as JSON on the command line)."""

    model_id: str
    backend: str = "mlx-lm"
    parent_pid: int = 0
    heartbeat_interval_sec: float = 1.0
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("worker config must be a JSON object")
        return cls(**data)


class Worker:
    """State of one worker process: its channel, its model and what it is doing."""

    def __init__(self, config: WorkerConfig, channel: P.Channel) -> None:
        self.config = config
        self.channel = channel
        self.phase = "start"
        self.last_send = time.monotonic()
        self.model: Model | None = None
        self.pending: list[dict[str, Any]] = []  # frames read while busy (e.g. shutdown)
        self.current_id: Any = None  # id of the request being served
        self._done = threading.Event()
        from metal_guard.settings import get_settings
        from metal_guard.testing import worker_faults_enabled

        # test-only faults: METALGUARD_WORKER_TEST_FAULTS=1 *and* METALGUARD_TESTING=1
        self.test_faults = worker_faults_enabled(get_settings())

    # ------------------------------------------------------------------ sending

    def send(self, obj: dict[str, Any]) -> None:
        try:
            self.channel.send(obj)
        except (OSError, EOFError, ValueError):
            os._exit(EXIT_PARENT_GONE)  # the parent is gone; nobody to answer
        self.last_send = time.monotonic()

    def watch(self) -> None:
        """Watcher thread: parent liveness and heartbeats. Never touches MLX.

        Heartbeats are sent only while the model loads, which cannot report finer progress.
        Prefill reports each finished chunk (:meth:`_prefill_progress`) and decoding each
        token: a step that stalls longer than the parent's timeout is a hang, and the parent
        treats it as one.
        """
        parent = self.config.parent_pid
        interval = max(0.05, float(self.config.heartbeat_interval_sec))
        while not self._done.wait(WATCH_INTERVAL_SEC):
            if parent and os.getppid() != parent:
                os._exit(EXIT_PARENT_GONE)
            phase = self.phase
            if phase in HEARTBEAT_PHASES and time.monotonic() - self.last_send >= interval:
                self.send(P.frame(P.HEARTBEAT, phase=phase, ts=time.time()))

    def check_interrupt(self) -> None:
        """Between generation steps: act on a ``stop`` or ``shutdown`` from the parent."""
        try:
            while self.channel.poll(0):
                msg = self.channel.recv()
                if msg["type"] == P.STOP:
                    if msg.get("id") != self.current_id:
                        continue  # a late stop meant for an earlier request
                    raise GenerationStopped(str(msg.get("reason") or "stopped by parent"))
                if msg["type"] == P.SHUTDOWN:
                    self.pending.append(msg)
                    raise GenerationStopped("worker shutting down")
                self.pending.append(msg)
        except (EOFError, OSError):
            os._exit(EXIT_PARENT_GONE)

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> bool:
        self.phase = "load"
        start = time.monotonic()
        try:
            kwargs = dict(self.config.load_kwargs)
            fault = kwargs.pop("_debug_fault", None)
            if fault is not None:  # test hook: fail while loading, before importing MLX
                if not self.test_faults:
                    raise PermissionError("debug faults are disabled in this worker")
                from metal_guard.isolation.faults import run_fault

                run_fault(self, {"kind": fault})
            self.model = Model.load(self.config.model_id, self.config.backend, kwargs)
        except BaseException as exc:
            self._send_error(None, exc, phase="load")
            return False
        from metal_guard import backend
        from metal_guard.isolation.helpers import process_create_time

        self.phase = "idle"
        self.send(P.frame(
            P.READY,
            pid=os.getpid(),
            create_time=process_create_time(os.getpid()),
            model_id=self.config.model_id,
            backend=self.config.backend,
            load_sec=round(time.monotonic() - start, 4),
            mlx_version=backend.mlx_version(),
            device=backend.backend_name(load=False),
            recommended_working_set_bytes=backend.recommended_working_set_bytes(load=False),
            has_chat_template=self.model.has_chat_template,
            test_faults=self.test_faults,
        ))
        return True

    def serve(self) -> int:
        while True:
            if self.pending:
                msg = self.pending.pop(0)
            else:
                try:
                    msg = self.channel.recv()
                except (EOFError, OSError):
                    return EXIT_PARENT_GONE
                except P.ProtocolError as exc:
                    self._send_error(None, exc, phase="protocol")
                    continue
            kind = msg["type"]
            if kind == P.SHUTDOWN:
                return 0
            if kind == P.GENERATE:
                self._run(msg, self._generate)
            elif kind == P.STATS:
                self.send(P.frame(P.STATS, **self._stats()))
            elif kind == P.DEBUG_FAULT:
                self._run(msg, self._fault)
            # a STOP while idle has nothing to stop

    def _run(self, msg: dict[str, Any], fn: Any) -> None:
        rid = msg.get("id")
        self.current_id = rid
        try:
            fn(msg)
        except BaseException as exc:
            if isinstance(exc, SystemExit):
                raise
            self._send_error(rid, exc, phase=self.phase)
        finally:
            self.phase = "idle"
            self.current_id = None

    # ------------------------------------------------------------------ requests

    def _generate(self, req: dict[str, Any]) -> None:
        from metal_guard.isolation.helpers import (
            gemma4_generation_flush,
            subprocess_inference_guard,
        )

        assert self.model is not None
        rid = req["id"]
        delay = float(req.get("debug_token_delay_sec") or 0.0) if self.test_faults else 0.0
        self.phase = "prefill"
        with subprocess_inference_guard(self.config.model_id):
            gemma4_generation_flush(self.config.model_id, self.model.generate_count)
            n = 0
            last = None
            pending: list[str] = []
            flushed = float("-inf")
            with contextlib.closing(self.model.stream(req, on_prefill=self._prefill_progress,
                                                      before_prefill=self._guard_prefill)) \
                    as steps:
                for step in steps:
                    self.phase = "generate"
                    n += 1
                    last = step
                    pending.append(step.text)
                    now = time.monotonic()
                    if now - flushed >= TOKEN_COALESCE_SEC:  # see TOKEN_COALESCE_SEC
                        self.send(P.frame(P.TOKEN, id=rid, text="".join(pending), n=n))
                        pending.clear()
                        flushed = now
                    if delay:
                        time.sleep(delay)
                    self.check_interrupt()
            if pending:
                self.send(P.frame(P.TOKEN, id=rid, text="".join(pending), n=n))
        self.send(P.frame(P.DONE, id=rid, **self.model.summary(last, n)))

    def _guard_prefill(self, n_tokens: int) -> None:
        """R4 in the worker: refuse (defensive) a prompt whose estimated prefill peak passes
        the single-allocation ceiling or the free memory, before it is allocated."""
        from metal_guard.prefill import lookup_dims, require_prefill_fit

        assert self.model is not None
        dims = self.model.dims or lookup_dims(self.config.model_id)
        if dims is None:
            return
        available = None
        with contextlib.suppress(Exception):
            from metal_guard.hardware import system_memory

            free = system_memory().available_bytes
            available = free / 1e9 if isinstance(free, int) else None
        require_prefill_fit(context_tokens=n_tokens, dims=dims, available_gb=available)
        self.send(P.frame(P.HEARTBEAT, phase="prefill", processed=0, total=n_tokens))

    def _prefill_progress(self, processed: int, total: int) -> None:
        self.send(P.frame(P.HEARTBEAT, phase="prefill", processed=processed, total=total))
        self.check_interrupt()

    def _stats(self) -> dict[str, Any]:
        from metal_guard import backend

        counters = backend.memory_counters(load=False)
        out: dict[str, Any] = {"pid": os.getpid()}
        if counters is not None:
            out.update(active_bytes=counters.active_bytes, peak_bytes=counters.peak_bytes,
                       cache_bytes=counters.cache_bytes, limit_bytes=counters.limit_bytes)
        if self.model is not None:
            out["generate_count"] = self.model.generate_count
        return out

    def _fault(self, req: dict[str, Any]) -> None:
        if not self.test_faults:
            raise PermissionError(
                "debug faults are disabled (start the worker with METALGUARD_TESTING=1 and "
                "METALGUARD_WORKER_TEST_FAULTS=1)"
            )
        from metal_guard.isolation.faults import run_fault
        from metal_guard.isolation.helpers import subprocess_inference_guard

        self.phase = "generate"
        with subprocess_inference_guard(self.config.model_id):  # a fault looks like a generation
            result = run_fault(self, req)
        self.send(P.frame(P.DONE, id=req.get("id"), finish_reason="fault", **result))

    def _send_error(self, rid: Any, exc: BaseException, *, phase: str) -> None:
        from metal_guard.classify import classify_mlx_error

        cls = classify_mlx_error(exc)
        self.send(P.frame(
            P.ERROR,
            id=rid,
            phase=phase,
            exc_type=type(exc).__name__,
            message=_clip(str(exc)),
            traceback=_clip("".join(traceback.format_exception(exc))),
            error_class=cls.name if cls else None,
        ))

    def run(self) -> int:
        thread = threading.Thread(target=clearing_streams(self.watch), name="metal-guard-worker-watch", daemon=True)
        thread.start()
        try:
            if not self.load():
                return EXIT_LOAD_FAILED
            return self.serve()
        finally:
            self._done.set()


def _clip(text: str, limit: int = ERROR_TEXT_MAX_CHARS) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n...[{len(text) - 2 * half} characters cut]...\n{text[-half:]}"


def _prepare_process(config: WorkerConfig) -> None:
    os.environ.update({str(k): str(v) for k, v in config.env.items()})
    os.environ["METALGUARD_SUBPROCESS_WORKER"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:  # normally already done by the parent (process_group=0)
        if os.getpgrp() != os.getpid():
            os.setpgid(0, 0)
    except OSError:
        pass
    faulthandler.enable(file=sys.stderr, all_threads=True)
    # `kill -USR1 <pid>` (and the parent, before killing a stalled worker) dumps every
    # thread's stack into the log, even while a C call holds the GIL.
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metal_guard.isolation.worker")
    parser.add_argument("--fd", type=int, required=True, help="inherited socket to the parent")
    parser.add_argument("--config", required=True, help="WorkerConfig as JSON")
    args = parser.parse_args(argv)
    config = WorkerConfig.from_json(args.config)
    _prepare_process(config)
    channel = P.Channel.from_fd(args.fd, P.PARENT_FRAMES)
    worker = Worker(config, channel)
    code = worker.run()
    sys.stdout.flush()
    sys.stderr.flush()
    if code == EXIT_PARENT_GONE:
        os._exit(code)  # skip atexit handlers: nobody is waiting for a clean exit
    return code


if __name__ == "__main__":
    sys.exit(main())
