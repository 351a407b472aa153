"""Model loading, prompt formatting and sampling inside a worker (mlx-lm and mlx-vlm).

Imported by the worker; it imports ``mlx_lm`` / ``mlx_vlm`` only inside functions, and
touches ``mlx.core`` only through :mod:`metal_guard.backend`. The parent imports just the
constants (:data:`SAMPLING_KEYS`, :data:`BACKENDS`).

Sampling: with mlx-lm every argument goes through ``mlx_lm.sample_utils.make_sampler``
(``temperature``, ``top_p``, ``top_k``, ``min_p``, ``min_tokens_to_keep``, XTC) and
``make_logits_processors`` (repetition / presence / frequency penalties, ``logit_bias``);
mlx-vlm takes the same arguments natively. ``seed`` seeds MLX's global generator right
before the generation, which is exactly what ``mx.random.seed(s); mlx_lm.generate(...)``
does in-process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import Any

log = logging.getLogger("metal_guard.isolation.generation")

__all__ = ["BACKENDS", "SAMPLING_KEYS", "GenerationStopped", "Model", "normalize_backend"]

BACKENDS = ("mlx-lm", "mlx-vlm")
_ALIASES = {"mlx": "mlx-lm", "mlx_lm": "mlx-lm", "mlx-lm": "mlx-lm", "lm": "mlx-lm",
            "mlx_vlm": "mlx-vlm", "mlx-vlm": "mlx-vlm", "vlm": "mlx-vlm"}

#: Optional sampling arguments a ``generate`` request may carry (``None`` = library default).
SAMPLING_KEYS = (
    "top_p", "top_k", "min_p", "min_tokens_to_keep", "xtc_probability", "xtc_threshold",
    "repetition_penalty", "repetition_context_size", "presence_penalty",
    "presence_context_size", "frequency_penalty", "frequency_context_size", "logit_bias",
)
_SAMPLER_ARGS = {"top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "min_tokens_to_keep": "min_tokens_to_keep",
                 "xtc_probability": "xtc_probability", "xtc_threshold": "xtc_threshold"}
_PROCESSOR_ARGS = ("repetition_penalty", "repetition_context_size", "presence_penalty",
                   "presence_context_size", "frequency_penalty", "frequency_context_size")


def normalize_backend(name: str) -> str:
    """``"mlx-lm"`` or ``"mlx-vlm"`` (accepts the seed's ``"mlx"`` and underscore spellings)."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return _ALIASES[key]


class GenerationStopped(Exception):
    """The parent asked the worker to end the current request early."""


def _messages(prompt: Any, system: str | None) -> list[dict[str, Any]]:
    if isinstance(prompt, list):
        messages = [dict(m) for m in prompt]
    else:
        messages = [{"role": "user", "content": str(prompt)}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _plain(prompt: Any, system: str | None) -> str:
    if isinstance(prompt, list):
        text = "\n\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
    else:
        text = str(prompt)
    return f"{system}\n\n{text}" if system else text


class Model:
    """A loaded model plus what is needed to run requests against it."""

    def __init__(self, backend: str, model: Any, processor: Any) -> None:
        self.backend = backend
        self.model = model
        self.processor = processor
        self.generate_count = 0

    @classmethod
    def load(cls, model_id: str, backend: str, load_kwargs: dict[str, Any]) -> Model:
        backend = normalize_backend(backend)
        if backend == "mlx-lm":
            from mlx_lm.utils import load

            model, tokenizer = load(model_id, **load_kwargs)[:2]
            return cls(backend, model, tokenizer)
        import mlx_vlm

        model, processor = mlx_vlm.load(model_id, **load_kwargs)
        return cls(backend, model, processor)

    @property
    def has_chat_template(self) -> bool:
        proc = self.processor
        if self.backend == "mlx-lm":
            return bool(getattr(proc, "has_chat_template", False) or
                        getattr(proc, "chat_template", None))
        tok = getattr(proc, "tokenizer", None)
        return bool(getattr(proc, "chat_template", None) or getattr(tok, "chat_template", None))

    # ------------------------------------------------------------------ prompts

    def format_prompt(self, prompt: Any, system: str | None, template: bool,
                      num_images: int = 0) -> str:
        """The exact text handed to the library's ``stream_generate``."""
        if self.backend == "mlx-vlm":
            if not template:
                return _plain(prompt, system)
            import mlx_vlm

            config = getattr(self.model, "config", None)
            if self.has_chat_template:
                return str(mlx_vlm.apply_chat_template(self.processor, config,
                                                       _messages(prompt, system),
                                                       num_images=num_images))
            # no template (e.g. PaliGemma): let mlx-vlm add its image tokens; system as text
            user = _plain(prompt, None)
            text = str(mlx_vlm.apply_chat_template(self.processor, config, user,
                                                   num_images=num_images))
            return f"{system}\n\n{text}" if system else text
        if not template or not self.has_chat_template:
            return _plain(prompt, system)
        tok = self.processor
        try:
            return str(tok.apply_chat_template(_messages(prompt, system),
                                               add_generation_prompt=True, tokenize=False))
        except Exception as exc:  # e.g. a template that rejects the system role
            if not system:
                raise
            log.info("chat template rejected a system message (%s); folding it into the prompt",
                     exc)
            merged = _messages(prompt, None)
            merged[0]["content"] = f"{system}\n\n{merged[0].get('content', '')}"
            return str(tok.apply_chat_template(merged, add_generation_prompt=True,
                                               tokenize=False))

    # ------------------------------------------------------------------ generation

    @property
    def dims(self) -> Any:
        """The model's attention dimensions (:class:`~metal_guard.prefill.ModelDims`) for the
        prefill guard, from the loaded model's arguments; ``None`` when unknown."""
        if not hasattr(self, "_dims"):
            from metal_guard.prefill import dims_from_config

            dims = None
            for holder in (self.model, getattr(self.model, "language_model", None)):
                args = getattr(holder, "args", None) or getattr(holder, "config", None)
                if args is not None and hasattr(args, "__dict__"):
                    dims = dims_from_config(dict(vars(args)))
                if dims is not None:
                    break
            self._dims = dims
        return self._dims

    def _encode(self, prompt: str) -> list[int]:
        """Token ids exactly as ``mlx_lm.stream_generate`` would make them from ``prompt``."""
        tok = self.processor
        bos = getattr(tok, "bos_token", None)
        return list(tok.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos)))

    def _count_tokens(self, prompt: str) -> int | None:
        tok = getattr(self.processor, "tokenizer", self.processor)
        try:
            return len(tok.encode(prompt))
        except Exception:  # a processor without a plain tokenizer: no estimate
            return None

    def stream(self, req: dict[str, Any],
               on_prefill: Callable[[int, int], None] | None = None,
               before_prefill: Callable[[int], None] | None = None,
               ) -> Generator[Any, None, None]:
        """Yield the library's per-step responses for one ``generate`` request.

        ``before_prefill(n_tokens)`` runs once the prompt is tokenised, before anything is
        allocated for it (the prefill guard); ``on_prefill(done, total)`` after each prefill
        chunk.
        """
        from metal_guard import backend as mg_backend

        images = [str(p) for p in (req.get("images") or [])]
        prompt: Any = self.format_prompt(req["prompt"], req.get("system"),
                                         bool(req.get("apply_chat_template", True)), len(images))
        if self.backend == "mlx-lm":
            prompt = self._encode(prompt)  # tokenised once, here, so it can be checked first
            n_tokens: int | None = len(prompt)
        else:
            n_tokens = self._count_tokens(prompt)
        if before_prefill is not None and n_tokens is not None:
            before_prefill(n_tokens)
        extra = dict(req.get("extra") or {})
        seed = req.get("seed")
        mx = mg_backend.core()
        self.generate_count += 1
        if seed is not None and mx is not None:
            mx.random.seed(int(seed))
        max_tokens = int(req.get("max_tokens", 256))
        temperature = float(req.get("temperature") or 0.0)
        given = {k: req[k] for k in SAMPLING_KEYS if req.get(k) is not None}
        if self.backend == "mlx-vlm":
            import mlx_vlm

            if "logit_bias" in given:
                given["logit_bias"] = {int(k): float(v) for k, v in given["logit_bias"].items()}
            if seed is not None:
                given["seed"] = int(seed)
            yield from mlx_vlm.stream_generate(self.model, self.processor, prompt,
                                               image=images or None, max_tokens=max_tokens,
                                               temperature=temperature, **given, **extra)
            return
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        sampler_args = {dst: given[src] for src, dst in _SAMPLER_ARGS.items() if src in given}
        if sampler_args.get("xtc_probability", 0) > 0:
            tok = self.processor
            sampler_args["xtc_special_tokens"] = (list(tok.encode("\n")) +
                                                  list(getattr(tok, "eos_token_ids", []) or []))
        sampler = make_sampler(temp=temperature, **sampler_args)
        proc_args = {k: given[k] for k in _PROCESSOR_ARGS if k in given}
        bias = given.get("logit_bias")
        processors = make_logits_processors(
            {int(k): float(v) for k, v in bias.items()} if bias else None, **proc_args)
        if on_prefill is not None:
            extra.setdefault("prompt_progress_callback", on_prefill)
        yield from stream_generate(self.model, self.processor, prompt, max_tokens=max_tokens,
                                   sampler=sampler, logits_processors=processors or None,
                                   **extra)

    @staticmethod
    def summary(last: Any, steps: int) -> dict[str, Any]:
        """Fields of the ``done`` frame, from the library's last response."""
        def num(name: str, default: float = 0.0) -> float:
            value = getattr(last, name, default) if last is not None else default
            try:
                return float(value)
            except (TypeError, ValueError):
                return default

        peak_gb = num("peak_memory")
        return {
            "finish_reason": _finish_reason(last),
            "steps": steps,
            "prompt_tokens": int(num("prompt_tokens")),
            "generation_tokens": int(num("generation_tokens", steps)),
            "prompt_tps": round(num("prompt_tps"), 3),
            "generation_tps": round(num("generation_tps"), 3),
            "peak_memory_bytes": int(peak_gb * 1e9),
        }


#: Longest finish reason passed on (mlx-lm and mlx-vlm say "length" or "stop").
_MAX_REASON_CHARS = 32


def _finish_reason(last: Any) -> str | None:
    """The library's own finish reason, or ``None`` when it gave none (never an invented one)."""
    reason = getattr(last, "finish_reason", None) if last is not None else None
    if isinstance(reason, str) and 0 < len(reason) <= _MAX_REASON_CHARS and reason.isprintable():
        return reason
    return None
