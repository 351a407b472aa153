"""Adapter for ``mlx_lm``: model loading, single and streamed generation, batch generation.

Targets (each on the module that defines it; the package re-exports and ``mlx_lm.server``'s
aliases are rebound by ``install()``'s package sweep or bind the wrapper themselves):

=====================================  =========  =============================================
site                                   policy     what the policy sees
=====================================  =========  =============================================
``mlx_lm.utils:load``                  load       model id = the path or repo; local dir size
``mlx_lm.generate:generate``           generate   model, prompt length when given as tokens
``mlx_lm.generate:stream_generate``    generate   same, applied per resumption
``mlx_lm.generate:batch_generate``     generate   counts one inference per prompt
``mlx_lm.generate:BatchGenerator.insert``  generate   counts the inserted prompts, prefill guard
``…:BatchGenerator.insert_segments``   generate   same (``insert`` calls it; counted once)
``mlx_lm.generate:BatchGenerator.next``    step       OOM protection per batch step
``mlx_lm.generate:BatchGenerator.next_generated``  step  same
=====================================  =========  =============================================

``generate`` iterates ``stream_generate``; the depth guard applies the policy once.
Nothing here imports ``mlx_lm``: this module is imported by the post-import hook, while
``mlx_lm`` is still being imported.

**Composition with** ``isolated_model``: inside ``with isolated_model(...) as m:``, a call to
``mlx_lm.generate(m, tokenizer, prompt, max_tokens=...)`` or ``mlx_lm.stream_generate(...)``
whose model argument is the block's runner (or ``None``) runs in the isolated worker instead
of this process. ``generate`` returns the text; ``stream_generate`` yields
:class:`IsolatedResponse` objects (``.text``, ``.finish_reason``). Only ``prompt`` and
``max_tokens`` are forwarded, with greedy sampling as in mlx_lm's default (``sampler`` objects
cannot cross the process boundary).
Calls with an in-process model are never rerouted.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metal_guard.adapters.base import Target, guard_wrapper
from metal_guard.policy import CallInfo, model_id_of

NAME = "mlx_lm"


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name)


def _tokens(prompt: Any) -> int | None:
    """Prompt length when it is already tokens (a list or an ``mx.array``); ``None`` for text,
    which would need a second tokenisation to measure."""
    if isinstance(prompt, (list, tuple)):
        return len(prompt)
    size = getattr(prompt, "size", None)
    if isinstance(size, int) and not isinstance(prompt, (str, bytes)):
        return size
    return None


def describe_load(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallInfo:
    ref = _arg(args, kwargs, 0, "path_or_hf_repo")
    model_id = os.fspath(ref) if isinstance(ref, (str, os.PathLike)) else None
    local = None
    if model_id:
        path = Path(model_id).expanduser()
        if path.is_dir():
            local = str(path)
    return CallInfo("mlx_lm.utils:load", model_id=model_id, local_path=local)


def describe_generate(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallInfo:
    model = _arg(args, kwargs, 0, "model")
    prompt = _arg(args, kwargs, 2, "prompt")
    return CallInfo("mlx_lm.generate", model=model, model_id=model_id_of(model),
                    prompt_tokens=_tokens(prompt))


def _batch(model: Any, prompts: Any, site: str) -> CallInfo:
    count, longest = 1, None
    if isinstance(prompts, (list, tuple)):
        count = len(prompts)
        lengths = [n for n in (_tokens(p) for p in prompts) if n is not None]
        longest = max(lengths) if lengths else None
    return CallInfo(site, model=model, model_id=model_id_of(model), prompt_tokens=longest, count=count)


def describe_batch_generate(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallInfo:
    return _batch(_arg(args, kwargs, 0, "model"), _arg(args, kwargs, 2, "prompts"),
                  "mlx_lm.generate:batch_generate")


def describe_batch_insert(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallInfo:
    return _batch(getattr(instance, "model", None), _arg(args, kwargs, 0, "prompts"),
                  "mlx_lm.generate:BatchGenerator.insert")


def describe_batch_insert_segments(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallInfo:
    """``insert_segments(segments, ...)``: one prompt per entry, each a list of token segments
    (what ``mlx_lm.server`` 0.32 inserts after a prompt-cache hit); its length is their sum."""
    segments = _arg(args, kwargs, 0, "segments")
    count, longest = 1, None
    if isinstance(segments, (list, tuple)):
        count = len(segments)
        lengths = []
        for prompt in segments:
            parts = [_tokens(seg) for seg in prompt] if isinstance(prompt, (list, tuple)) else [None]
            if parts and all(n is not None for n in parts):
                lengths.append(sum(n for n in parts if n is not None))
        longest = max(lengths) if lengths else None
    model = getattr(instance, "model", None)
    return CallInfo("mlx_lm.generate:BatchGenerator.insert_segments", model=model,
                    model_id=model_id_of(model), prompt_tokens=longest, count=count)


def describe_batch_step(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallInfo:
    model = getattr(instance, "model", None)
    return CallInfo("mlx_lm.generate:BatchGenerator.next", model=model, model_id=model_id_of(model))


# --------------------------------------------------------------------------- isolated_model


@dataclass(frozen=True)
class IsolatedResponse:
    """One chunk of a ``stream_generate`` call served by an ``isolated_model`` worker."""

    text: str
    finish_reason: str | None = None


def _isolated_runner(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    context = sys.modules.get("metal_guard.isolation.context")  # never imported from here
    if context is None:
        return None
    runner = context.current_isolated_model()
    if runner is None:
        return None
    model = _arg(args, kwargs, 0, "model")
    return runner if model is None or model is runner else None


def _routed(args: tuple[Any, ...], kwargs: dict[str, Any], *, streaming: bool) -> tuple[Any, dict[str, Any]]:
    """``(prompt, {"max_tokens": n})``; stream_generate takes ``max_tokens`` 4th, generate does not."""
    prompt = _arg(args, kwargs, 2, "prompt")
    max_tokens = _arg(args, kwargs, 3, "max_tokens") if streaming else kwargs.get("max_tokens")
    # mlx_lm samples greedily unless given a sampler, which cannot cross the process boundary
    return prompt, {"max_tokens": int(max_tokens if max_tokens is not None else 256), "temperature": 0.0}


_generate_guard = guard_wrapper("generate", "call", site="mlx_lm.generate:generate",
                                describe=describe_generate)
_stream_guard = guard_wrapper("generate", "gen", site="mlx_lm.generate:stream_generate",
                              describe=describe_generate)


def wrap_generate(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    runner = _isolated_runner(args, kwargs)
    if runner is None:
        return _generate_guard(wrapped, instance, args, kwargs)
    prompt, options = _routed(args, kwargs, streaming=False)
    return runner.generate(prompt, **options)


def wrap_stream_generate(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    runner = _isolated_runner(args, kwargs)
    if runner is None:
        return _stream_guard(wrapped, instance, args, kwargs)
    prompt, options = _routed(args, kwargs, streaming=True)
    return _chunks(runner.stream_generate(prompt, **options))


def _chunks(texts: Iterator[str]) -> Iterator[IsolatedResponse]:
    pending: str | None = None
    for text in texts:
        if pending is not None:
            yield IsolatedResponse(pending)
        pending = text
    if pending is not None:
        yield IsolatedResponse(pending, "stop")


TARGETS: tuple[Target, ...] = (
    Target("mlx_lm.utils", "load", "load", describe_load),
    Target("mlx_lm.generate", "generate", "generate", describe_generate, wrapper=wrap_generate),
    Target("mlx_lm.generate", "stream_generate", "generate", describe_generate,
           wrapper=wrap_stream_generate),
    Target("mlx_lm.generate", "batch_generate", "generate", describe_batch_generate),
    Target("mlx_lm.generate", "BatchGenerator.insert", "generate", describe_batch_insert),
    Target("mlx_lm.generate", "BatchGenerator.insert_segments", "generate",
           describe_batch_insert_segments, required=False),
    Target("mlx_lm.generate", "BatchGenerator.next", "step", describe_batch_step),
    Target("mlx_lm.generate", "BatchGenerator.next_generated", "step", describe_batch_step),
)
