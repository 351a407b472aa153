"""Adapter for LangChain: ``MLXPipeline`` / ``ChatMLX`` guarded per object, plus a callback
handler for any LangChain LLM.

=================================================================  ========  ===================
site                                                               policy    context
=================================================================  ========  ===================
``langchain_community.llms.mlx_pipeline:MLXPipeline._call``        generate  the object's
``langchain_community.llms.mlx_pipeline:MLXPipeline._stream``      generate  ``model_id`` and
``langchain_community.chat_models.mlx:ChatMLX._generate``          generate  ``model`` (the
``langchain_community.chat_models.mlx:ChatMLX._agenerate``         generate  pipeline's for
``langchain_community.chat_models.mlx:ChatMLX._stream``            generate  ``ChatMLX``)
``MLXPipeline._astream`` / ``ChatMLX._astream``                    —         one pinned thread
=================================================================  ========  ===================

The LangChain call is the outermost guarded call, so the policy sees the LangChain object's
model id even though the text is produced by ``mlx_lm.stream_generate`` underneath (which the
depth guard then lets through unguarded). Streaming is guarded per resumption. Async
streaming (``astream``) runs the sync generator on one dedicated thread instead of LangChain's
one-executor-thread-per-item default, because MLX streams are thread-affine; that thread clears
its MLX streams before it ends, and ``astream`` returns only after it has (bounded by
:data:`PUMP_EXIT_WAIT_SEC`), so the interpreter never exits under a half-finished pump. Loading
(``MLXPipeline.from_model_id`` → ``mlx_lm.load``) is guarded by the ``mlx_lm`` adapter.

langchain-community 0.4.2 is broken against mlx-lm >= 0.32 (``formatter=`` and the moved
``generate_step``). When a module is patched, the knowledge layer's defensive patches
``langchain_mlx_pipeline`` / ``langchain_chat_mlx`` are spliced in under our wrappers (if the
installed versions need them); ``uninstall()`` takes back the ones it applied.

:class:`MetalGuardCallbackHandler` (in :mod:`._langchain_handler`) is registered through
LangChain's public configure hook as soon as ``langchain_core.callbacks.manager`` is imported,
so every LangChain LLM and chat model (not only MLX ones) gets the panic-gate / memory-pressure
check on start, error classification and per-call statistics while metal-guard is installed.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

from metal_guard.adapters._langchain_handler import MetalGuardCallbackHandler
from metal_guard.adapters.base import Target
from metal_guard.policy import CallInfo, model_id_of

NAME = "langchain"
#: The LangChain releases this adapter was written and tested for (see ``install_report``).
INSTRUMENTS = ("langchain-community>=0.4,<0.5", "langchain-core>=1.0,<2")
log = logging.getLogger("metal_guard.adapters.langchain")

__all__ = ["INSTRUMENTS", "NAME", "TARGETS", "MetalGuardCallbackHandler", "callback_handler", "register_callback_handler"]

PIPELINE = "langchain_community.llms.mlx_pipeline"
CHAT = "langchain_community.chat_models.mlx"
#: Knowledge-layer patch that fixes each module against the current mlx-lm.
_PATCHES = {PIPELINE: "langchain_mlx_pipeline", CHAT: "langchain_chat_mlx"}


def _pipeline_info(site: str, pipeline: Any) -> CallInfo:
    model = getattr(pipeline, "model", None)
    model_id = getattr(pipeline, "model_id", None) or model_id_of(model)
    return CallInfo(site, model=model, model_id=str(model_id) if model_id else None)


def describe_pipeline(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallInfo:
    return _pipeline_info(f"{PIPELINE}:MLXPipeline", instance)


def describe_chat(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallInfo:
    return _pipeline_info(f"{CHAT}:ChatMLX", getattr(instance, "llm", None))


# --------------------------------------------------------------------------- async streaming

_STOP = object()
#: How long a finished ``astream`` waits for its pump thread to close the generator and clear
#: its MLX streams (a pump stuck inside MLX longer than this is left behind, as a daemon).
PUMP_EXIT_WAIT_SEC = 30.0


async def _pinned_astream(wrapped: Any, instance: Any, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> AsyncIterator[Any]:
    """``_astream`` that runs the (guarded) sync ``_stream`` generator on **one** thread.

    LangChain's default steps the generator with ``run_in_executor`` — a different pool thread
    for each item — while MLX streams are thread-affine (mlx-lm's ``generate_step`` runs under
    ``with mx.stream(...)``, which fails when it is closed from another thread). Here one
    dedicated thread creates, steps and closes the generator, in lock-step with the consumer;
    breaking out of ``astream`` closes it on that same thread.
    """
    positional = list(args)  # (input, stop, run_manager) + **kwargs, as the default _astream
    if len(positional) > 2:
        positional[2] = positional[2].get_sync() if positional[2] is not None else None
    elif kwargs.get("run_manager") is not None:
        kwargs["run_manager"] = kwargs["run_manager"].get_sync()
    from metal_guard.threads import clearing_streams

    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    demand: queue.SimpleQueue[bool] = queue.SimpleQueue()
    results: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    finished = threading.Event()
    exited: asyncio.Future[None] = loop.create_future()

    def post(kind: str, value: Any) -> None:
        loop.call_soon_threadsafe(results.put_nowait, (kind, value))

    def mark_exited() -> None:
        if not exited.done():
            exited.set_result(None)

    def pump_and_clear() -> None:
        try:
            clearing_streams(pump)()
        finally:
            finished.set()
            try:
                loop.call_soon_threadsafe(mark_exited)
            except RuntimeError:  # the loop is closed: nobody is waiting
                pass

    def pump() -> None:
        gen = None
        try:
            gen = context.run(instance._stream, *positional, **kwargs)
            while demand.get():
                item = context.run(next, gen, _STOP)
                if item is _STOP:
                    post("done", None)
                    return
                post("item", item)
        except BaseException as exc:  # delivered to the consumer
            post("error", exc)
        finally:
            if gen is not None:
                context.run(gen.close)

    thread = threading.Thread(target=pump_and_clear, name="metal-guard-langchain-stream", daemon=True)
    thread.start()
    try:
        while True:
            demand.put(True)
            kind, value = await results.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        demand.put(False)  # the pump closes the generator on its own thread, clears its streams
        if not finished.is_set():
            try:
                await asyncio.wait_for(asyncio.shield(exited), PUMP_EXIT_WAIT_SEC)
            except TimeoutError:
                log.warning("the LangChain stream thread did not finish within %.0f s",
                            PUMP_EXIT_WAIT_SEC)


TARGETS: tuple[Target, ...] = (
    Target(PIPELINE, "MLXPipeline._call", "generate", describe_pipeline),
    Target(PIPELINE, "MLXPipeline._stream", "generate", describe_pipeline),
    Target(PIPELINE, "MLXPipeline._astream", "generate", wrapper=_pinned_astream, required=False),
    Target(CHAT, "ChatMLX._generate", "generate", describe_chat),
    Target(CHAT, "ChatMLX._agenerate", "generate", describe_chat, required=False),
    Target(CHAT, "ChatMLX._stream", "generate", describe_chat),
    Target(CHAT, "ChatMLX._astream", "generate", wrapper=_pinned_astream, required=False),
)


# --------------------------------------------------------------------------- callback hook

_lock = threading.Lock()
_registered = False
_active = False
_handler: MetalGuardCallbackHandler | None = None
_applied_patches: set[str] = set()


def callback_handler() -> MetalGuardCallbackHandler:
    """The process-wide handler the configure hook adds to every LangChain run (its
    :meth:`~MetalGuardCallbackHandler.stats` are the per-call statistics)."""
    global _handler
    with _lock:
        if _handler is None:
            _handler = MetalGuardCallbackHandler()
        return _handler


class _HandlerVar:
    """What LangChain's configure hook reads: ``get()`` is the shared handler while the
    adapter is patched and metal-guard installed, else ``None`` (nothing is added).

    A ``ContextVar`` would not do: its value set in one thread is invisible to new threads,
    and the hook cannot be unregistered. LangChain only calls ``get()`` on it.
    """

    def get(self) -> MetalGuardCallbackHandler | None:
        if not _active:
            return None
        from metal_guard.policy import ACTIVATION, guards_inactive

        if not ACTIVATION.generation or guards_inactive():
            return None
        return callback_handler()


def register_callback_handler() -> bool:
    """Register the configure hook with LangChain (once per process); ``False`` if
    ``langchain_core`` is not available. Called by the adapter; harmless to call again."""
    global _registered
    with _lock:
        if _registered:
            return True
        try:
            from langchain_core.tracers.context import register_configure_hook
        except ImportError as exc:
            log.debug("langchain_core unavailable: %s", exc)
            return False
        register_configure_hook(_HandlerVar(), True, MetalGuardCallbackHandler)  # type: ignore[arg-type]
        _registered = True
        return True


def on_patched(module: ModuleType) -> None:
    """Post-patch hook (called by ``install()`` for each trigger module)."""
    global _active
    _active = True
    register_callback_handler()
    patch = _PATCHES.get(module.__name__)
    if patch is not None:
        _apply_knowledge_patch(patch)


def on_unpatched() -> None:
    global _active
    _active = False
    if not _applied_patches:
        return
    try:
        from metal_guard.knowledge.patches import uninstall_upstream_defensive_patches

        uninstall_upstream_defensive_patches(patches=sorted(_applied_patches))
    except Exception as exc:
        log.warning("could not remove the LangChain defensive patches: %s", exc)
    _applied_patches.clear()


def _apply_knowledge_patch(name: str) -> None:
    # Only this module's patch: the other module may still be executing (``chat_models.mlx``
    # imports ``mlx_pipeline`` first) and is patched by its own hook once it has run.
    try:
        from metal_guard.knowledge.patches import APPLIED, install_upstream_defensive_patches

        states = install_upstream_defensive_patches(patches=[name], only_imported=True)
    except Exception as exc:
        log.warning("LangChain defensive patches unavailable: %s", exc)
        return
    for name, state in states.items():
        if state == APPLIED and getattr(state, "reason", "") != "already installed":
            _applied_patches.add(name)
        log.debug("defensive patch %s: %s %s", name, state, getattr(state, "reason", ""))
