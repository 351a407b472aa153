"""Replacement ``MLXPipeline._call`` / ``MLXPipeline._stream`` / ``ChatMLX._stream`` for
langchain-community against the current mlx-lm API.

langchain-community 0.4.2 calls ``mlx_lm.generate(..., formatter=...)`` (removed from mlx-lm)
and imports ``generate_step`` from ``mlx_lm.utils`` (moved), so both ``invoke`` and ``stream``
fail with mlx-lm 0.32. These functions do the same job on ``mlx_lm.stream_generate``,
``make_sampler`` and ``make_logits_processors``, honour the ``pipeline_kwargs`` the originals
read, and also honour ``stop`` sequences (the output is cut before the first stop string).

``stream_generate`` is looked up in the ``mlx_lm.generate`` module at every call, so a
metal-guard adapter (or anyone else) wrapping it there sees these calls too. Importing this
module imports neither mlx_lm nor langchain.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from typing import Any

log = logging.getLogger("metal_guard.knowledge.patches")

#: Keys of ``pipeline_kwargs`` forwarded unchanged to ``stream_generate`` / ``generate_step``.
PASSTHROUGH_KEYS = frozenset({
    "max_kv_size", "prefill_step_size", "kv_bits", "kv_group_size", "quantized_kv_start",
    "prompt_cache", "draft_model", "num_draft_tokens",
})
_SAMPLER_KEYS = ("top_p", "min_p", "min_tokens_to_keep", "top_k", "xtc_probability",
                 "xtc_threshold", "xtc_special_tokens")
_PENALTY_KEYS = ("logit_bias", "repetition_penalty", "presence_penalty", "frequency_penalty")
_CONTEXT_KEYS = ("repetition_context_size", "presence_context_size", "frequency_context_size")
#: The defaults of the langchain-community originals.
DEFAULT_MAX_TOKENS = 100
_warned_formatter = False


class StopFilter:
    """Cut a stream of text pieces before the first occurrence of any stop string.

    Text that could be the start of a stop string is held back until it is decided, so a
    stop string split across pieces is still found and never emitted.
    """

    def __init__(self, stops: Sequence[str] | None) -> None:
        self.stops = tuple(s for s in (stops or ()) if s)
        self._longest = max((len(s) for s in self.stops), default=0)
        self._buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self._buffer += text
        if not self.stops:
            out, self._buffer = self._buffer, ""
            return out
        hits = [i for i in (self._buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self._buffer[: min(hits)]
            self._buffer = ""
            self.stopped = True
            return out
        hold = 0
        for k in range(min(len(self._buffer), self._longest - 1), 0, -1):
            tail = self._buffer[-k:]
            if any(s.startswith(tail) for s in self.stops):
                hold = k
                break
        cut = len(self._buffer) - hold
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out

    def flush(self) -> str:
        out, self._buffer = ("" if self.stopped else self._buffer), ""
        return out


@cache
def _parameters(func: Any) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return frozenset()


def generation_kwargs(pipeline_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``stream_generate`` keyword arguments for langchain-style ``pipeline_kwargs``.

    Understood keys: ``max_tokens`` (default 100), ``temp``/``temperature`` (default 0 =
    greedy), ``top_p``, ``min_p``, ``min_tokens_to_keep``, ``top_k``, ``xtc_*``,
    ``repetition_penalty`` / ``presence_penalty`` / ``frequency_penalty`` with their
    ``*_context_size`` (default 20), ``logit_bias``, and :data:`PASSTHROUGH_KEYS`.
    ``verbose`` is ignored and ``formatter`` (removed from mlx-lm) is ignored with a warning.
    """
    global _warned_formatter
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    opts = dict(pipeline_kwargs or {})
    out: dict[str, Any] = {"max_tokens": int(opts.pop("max_tokens", DEFAULT_MAX_TOKENS))}
    temp = opts.pop("temp", None)
    temp = opts.pop("temperature", None) if temp is None else temp
    sampler_args = {k: opts.pop(k) for k in _SAMPLER_KEYS if k in opts}
    sampler_args = {k: v for k, v in sampler_args.items() if v is not None}
    if sampler_args.get("top_p") == 1.0:
        sampler_args.pop("top_p")  # 1.0 means "no nucleus filtering" in langchain's defaults
    supported = _parameters(make_sampler)
    out["sampler"] = make_sampler(float(temp or 0.0),
                                  **{k: v for k, v in sampler_args.items() if k in supported})
    penalty_args = {k: opts.pop(k) for k in (*_PENALTY_KEYS, *_CONTEXT_KEYS) if k in opts}
    for key in _CONTEXT_KEYS:  # the originals pass None, which mlx-lm cannot use
        if penalty_args.get(key) is None:
            penalty_args.pop(key, None)
    supported = _parameters(make_logits_processors)
    out["logits_processors"] = make_logits_processors(
        **{k: v for k, v in penalty_args.items() if k in supported})
    opts.pop("verbose", None)
    if opts.pop("formatter", None) is not None and not _warned_formatter:
        _warned_formatter = True
        log.warning("pipeline_kwargs['formatter'] is ignored: mlx-lm no longer supports it")
    for key in sorted(PASSTHROUGH_KEYS & set(opts)):
        out[key] = opts.pop(key)
    if opts:
        log.debug("ignoring unsupported pipeline_kwargs: %s", ", ".join(sorted(opts)))
    return out


def iter_text(model: Any, tokenizer: Any, prompt: Any, pipeline_kwargs: Mapping[str, Any] | None,
              stop: Sequence[str] | None = None) -> Iterator[str]:
    """Generate with ``mlx_lm.stream_generate`` and yield text pieces, honouring ``stop``."""
    if model is None or tokenizer is None:
        raise ValueError("MLXPipeline has no model/tokenizer: build it with from_model_id() or "
                         "pass model= and tokenizer=")
    kwargs = generation_kwargs(pipeline_kwargs)
    stream_generate = importlib.import_module("mlx_lm.generate").stream_generate
    responses = stream_generate(model, tokenizer, prompt, **kwargs)
    stops = StopFilter(stop)
    try:
        for response in responses:
            piece = stops.feed(response.text)
            if piece:
                yield piece
            if stops.stopped:
                return
        tail = stops.flush()
        if tail:
            yield tail
    finally:
        responses.close()  # restore mlx-lm's wired limit now, not at garbage collection


def _options(kwargs: Mapping[str, Any], default: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    # Same precedence as the originals: a per-call dict replaces the object's pipeline_kwargs.
    for key in ("pipeline_kwargs", "model_kwargs"):
        if kwargs.get(key) is not None:
            return kwargs[key]  # type: ignore[no-any-return]
    return default


def pipeline_call(self: Any, prompt: str, stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> str:
    """``MLXPipeline._call`` on the current mlx-lm API."""
    return "".join(iter_text(self.model, self.tokenizer, prompt,
                             _options(kwargs, self.pipeline_kwargs), stop))


def pipeline_stream(self: Any, prompt: str, stop: list[str] | None = None,
                    run_manager: Any = None, **kwargs: Any) -> Iterator[Any]:
    """``MLXPipeline._stream`` on the current mlx-lm API."""
    from langchain_core.outputs import GenerationChunk

    for text in iter_text(self.model, self.tokenizer, prompt,
                          _options(kwargs, self.pipeline_kwargs), stop):
        chunk = GenerationChunk(text=text)
        if run_manager is not None:
            run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        yield chunk


def chat_stream(self: Any, messages: list[Any], stop: list[str] | None = None,
                run_manager: Any = None, **kwargs: Any) -> Iterator[Any]:
    """``ChatMLX._stream`` on the current mlx-lm API (same prompt as ``invoke`` uses)."""
    from langchain_core.messages import AIMessageChunk
    from langchain_core.outputs import ChatGenerationChunk

    prompt = self._to_chat_prompt(messages)
    for text in iter_text(self.llm.model, self.llm.tokenizer, prompt,
                          _options(kwargs, self.llm.pipeline_kwargs), stop):
        chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
        if run_manager is not None:
            run_manager.on_llm_new_token(text, chunk=chunk)
        yield chunk
