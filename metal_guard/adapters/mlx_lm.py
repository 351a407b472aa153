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
:class:`IsolatedResponse` objects (``.text``; the last one's ``.finish_reason`` is the
worker's: ``"length"`` or ``"stop"``). The prompt is used as given (no chat template, as in
mlx_lm). Sampling crosses as values — ``temp``, ``top_p``, ``min_p``, ``top_k``, ``seed``,
penalties ... (:data:`ROUTED_SAMPLING`) — with mlx_lm's defaults when unset (greedy,
``max_tokens=256``); a ``sampler`` function, ``logits_processors``, a draft model or a prompt
cache cannot cross and raise ``TypeError`` (mlx_lm's own ``greedy_sampler`` is accepted).
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
#: The mlx-lm releases this adapter was written and tested for (see ``install_report``).
INSTRUMENTS = ("mlx-lm>=0.32,<0.33",)


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


#: Sampling keywords a routed call may carry (metal-guard's extension: in-process mlx_lm takes
#: them through ``make_sampler`` / ``make_logits_processors`` instead); mlx_lm's defaults apply
#: to what is not given (``temp=0.0``: greedy).
ROUTED_SAMPLING = (
    "temp", "top_p", "min_p", "min_tokens_to_keep", "top_k", "xtc_probability", "xtc_threshold",
    "seed", "repetition_penalty", "repetition_context_size", "presence_penalty",
    "presence_context_size", "frequency_penalty", "frequency_context_size", "logit_bias",
)
#: mlx_lm ``generate_step`` keywords with plain values: handed to the worker's ``stream_generate``.
ROUTED_PASSTHROUGH = ("max_kv_size", "prefill_step_size", "kv_bits", "kv_group_size",
                      "quantized_kv_start")
#: Keywords whose values are live Python objects: they cannot cross into the worker.
CANNOT_CROSS = ("sampler", "logits_processors", "draft_model", "prompt_cache",
                "prompt_progress_callback", "input_embeddings", "stream")
#: mlx_lm's own default for ``max_tokens``.
MLX_LM_MAX_TOKENS = 256


def _cannot_cross(key: str, value: Any) -> bool:
    if value is None:
        return False
    if key == "logits_processors":
        return bool(value)
    if key == "sampler":  # mlx_lm's greedy sampler is what temp=0.0 gives in the worker
        sample_utils = sys.modules.get("mlx_lm.sample_utils")
        return value is not getattr(sample_utils, "greedy_sampler", object())
    return True


def _routed(args: tuple[Any, ...], kwargs: dict[str, Any], *, streaming: bool) -> tuple[str, dict[str, Any], bool]:
    """``(prompt, runner keywords, verbose)`` for a call routed to an ``isolated_model`` worker.

    ``generate(model, tokenizer, prompt, verbose=False, **kwargs)`` and
    ``stream_generate(model, tokenizer, prompt, max_tokens=256, draft_model=None, **kwargs)``:
    the sampling settings cross as values; what holds a live object (a sampler function, logits
    processors, a draft model, a prompt cache, a callback) cannot, and is refused with a
    ``TypeError`` rather than silently dropped. An unknown keyword is a ``TypeError`` too, as
    mlx_lm itself would raise.
    """
    positional = ("model", "tokenizer", "prompt") + (("max_tokens", "draft_model") if streaming
                                                     else ("verbose",))
    if len(args) > len(positional):
        raise TypeError(f"too many positional arguments for a call routed to isolated_model "
                        f"({len(args)} > {len(positional)})")
    given = dict(zip(positional, args, strict=False))
    for key, value in kwargs.items():
        if key in given:
            raise TypeError(f"got multiple values for argument {key!r}")
        given[key] = value
    prompt = given.pop("prompt", None)
    given.pop("model", None)
    given.pop("tokenizer", None)
    verbose = bool(given.pop("verbose", False))
    if not isinstance(prompt, str):
        raise TypeError("a call routed to isolated_model needs the prompt as text (the worker "
                        f"tokenizes it); got {type(prompt).__name__}")
    blocked = sorted(k for k in given if k in CANNOT_CROSS and _cannot_cross(k, given[k]))
    if blocked:
        raise TypeError(
            f"{', '.join(blocked)} cannot cross into the isolated_model worker (a live Python "
            "object); pass sampling as values instead, e.g. temp=0.7, top_p=0.9, seed=0, "
            "repetition_penalty=1.1, or call the in-process model")
    unknown = sorted(k for k in given if k not in (*ROUTED_SAMPLING, *ROUTED_PASSTHROUGH,
                                                   *CANNOT_CROSS, "max_tokens"))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) for a call routed to isolated_model: "
                        f"{', '.join(unknown)} (sampling: {', '.join(ROUTED_SAMPLING)})")
    max_tokens = given.get("max_tokens")
    options: dict[str, Any] = {
        "max_tokens": MLX_LM_MAX_TOKENS if max_tokens is None else max_tokens,
        "temperature": given.get("temp") if given.get("temp") is not None else 0.0,
        "apply_chat_template": False,  # mlx_lm.generate uses the prompt as given
    }
    options.update((k, given[k]) for k in ROUTED_SAMPLING
                   if k != "temp" and given.get(k) is not None)
    extra = {k: given[k] for k in ROUTED_PASSTHROUGH if given.get(k) is not None}
    if extra:
        options["extra"] = extra
    return prompt, options, verbose


_generate_guard = guard_wrapper("generate", "call", site="mlx_lm.generate:generate",
                                describe=describe_generate)
_stream_guard = guard_wrapper("generate", "gen", site="mlx_lm.generate:stream_generate",
                              describe=describe_generate)


def wrap_generate(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    runner = _isolated_runner(args, kwargs)
    if runner is None:
        return _generate_guard(wrapped, instance, args, kwargs)
    prompt, options, verbose = _routed(args, kwargs, streaming=False)
    text = runner.generate(prompt, **options)
    if verbose:  # mlx_lm prints the text as it goes; the worker's statistics stay there
        print(text, flush=True)
    return text


def wrap_stream_generate(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    runner = _isolated_runner(args, kwargs)
    if runner is None:
        return _stream_guard(wrapped, instance, args, kwargs)
    prompt, options, _verbose = _routed(args, kwargs, streaming=True)
    return _chunks(runner, runner.stream_generate(prompt, **options))


def _chunks(runner: Any, texts: Iterator[str]) -> Iterator[IsolatedResponse]:
    """Re-yield the worker's text chunks; the last one carries the worker's real finish reason
    (``"length"`` when ``max_tokens`` ran out, ``"stop"`` at an end-of-sequence token)."""
    pending: str | None = None
    for text in texts:
        if pending is not None:
            yield IsolatedResponse(pending)
        pending = text
    result = getattr(runner, "last_result", None) or {}
    yield IsolatedResponse(pending or "", result.get("finish_reason"))


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
