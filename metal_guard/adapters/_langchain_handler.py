"""``MetalGuardCallbackHandler``: metal-guard's LangChain callback handler, for any LLM.

* **on start** (``on_llm_start`` / ``on_chat_model_start``): the panic gate (L10; its verdict
  is cached for ``gate_ttl_sec``) and a memory-pressure check. A refusal is raised — which
  vetoes the call, LangChain propagates it because the handler has ``raise_error=True`` — only
  in defensive mode and only for models that run on this machine's GPU (``veto="local"``: the
  class path or ``_type`` names MLX, llama.cpp, Ollama, a Hugging Face pipeline...). Remote
  APIs are never blocked by a local GPU condition; their check is recorded as a warning.
* **on error**: the error is classified (the one classifier table) and recorded with a
  breadcrumb; a Metal OOM gets the classifier's recovery hint in the log.
* **per call**: duration, streamed tokens and token usage when the model reports it, per model
  and in total — :meth:`MetalGuardCallbackHandler.stats`.

Nothing in this handler raises except a deliberate refusal: a failing check is logged and the
call goes ahead.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any
from uuid import UUID

from langchain_core.callbacks.base import BaseCallbackHandler

from metal_guard.breadcrumbs import breadcrumb_with_meta as _crumb

log = logging.getLogger("metal_guard.adapters.langchain")

#: Substrings of a model's class path / ``_type`` that mean "runs on the local GPU".
LOCAL_MARKERS = ("mlx", "llamacpp", "llama_cpp", "llama-cpp", "ollama", "huggingface_pipeline",
                 "huggingfacepipeline", "huggingface-pipeline", "gpt4all", "ctransformers",
                 "llamafile", "mlc", "chat_models.huggingface")
#: Used memory (of the MLX limit) at or above which a local call is refused after a cleanup.
CRITICAL_USED_PCT = 95.0
VETO_CHOICES = ("local", "all", "none")



def _identify(serialized: dict[str, Any] | None, kwargs: dict[str, Any]) -> str:
    path = (serialized or {}).get("id")
    name = ".".join(str(p) for p in path) if isinstance(path, (list, tuple)) and path else ""
    params = kwargs.get("invocation_params") or {}
    kind = params.get("_type") if isinstance(params, dict) else None
    name = name or str((serialized or {}).get("name") or "unknown-llm")
    return f"{name}[{kind}]" if kind else name


def _is_local(ident: str) -> bool:
    low = ident.lower()
    return any(marker in low for marker in LOCAL_MARKERS)


def _new_bucket() -> dict[str, Any]:
    return {"calls": 0, "completed": 0, "failed": 0, "refused": 0, "total_sec": 0.0,
            "max_sec": 0.0, "streamed_tokens": 0, "prompt_tokens": 0, "completion_tokens": 0}


class MetalGuardCallbackHandler(BaseCallbackHandler):
    """metal-guard checks and statistics for LangChain calls (see the module docstring).

    ``veto``: ``"local"`` (default) refuses calls to local-GPU models while a panic cooldown
    is active or memory is critical; ``"all"`` refuses any model; ``"none"`` only records.
    Observer mode (``METALGUARD_MODE=observer``) never refuses.
    """

    raise_error = True  # so a refusal in on_*_start vetoes the call; nothing else raises
    run_inline = True   # checks run before the call, in the caller's thread / event loop

    def __init__(self, *, veto: str = "local", gate_ttl_sec: float = 5.0,
                 critical_used_pct: float = CRITICAL_USED_PCT) -> None:
        if veto not in VETO_CHOICES:
            raise ValueError(f"veto must be one of {VETO_CHOICES}, got {veto!r}")
        self.veto = veto
        self.gate_ttl_sec = float(gate_ttl_sec)
        self.critical_used_pct = float(critical_used_pct)
        self._lock = threading.Lock()
        self._runs: dict[UUID, tuple[float, str]] = {}
        self._gate: tuple[float, Any] | None = None
        self.reset()

    # ------------------------------------------------------------------ statistics

    def reset(self) -> None:
        """Clear the statistics and the cached gate verdict."""
        with self._lock:
            self._gate = None
            self._total = _new_bucket()
            self._by_llm: dict[str, dict[str, Any]] = {}
            self._errors: dict[str, int] = {}
            self._last: dict[str, Any] | None = None

    def stats(self) -> dict[str, Any]:
        """``{"total": {...}, "by_llm": {ident: {...}}, "errors_by_class": {...}, "last": {...},
        "in_flight": n}``; each bucket has ``calls``, ``completed``, ``failed``, ``refused``,
        ``total_sec``, ``max_sec``, ``streamed_tokens``, ``prompt_tokens``, ``completion_tokens``."""
        with self._lock:
            return {"total": dict(self._total), "by_llm": {k: dict(v) for k, v in self._by_llm.items()},
                    "errors_by_class": dict(self._errors), "last": dict(self._last) if self._last else None,
                    "in_flight": len(self._runs)}

    def _add(self, ident: str, **delta: float) -> None:
        with self._lock:
            bucket = self._by_llm.setdefault(ident, _new_bucket())
            for target in (self._total, bucket):
                for key, value in delta.items():
                    if key == "max_sec":
                        target[key] = max(target[key], value)
                    else:
                        target[key] += value

    # ------------------------------------------------------------------ checks

    def _gate_verdict(self) -> Any:
        now = time.monotonic()
        cached = self._gate
        if cached is not None and now - cached[0] < self.gate_ttl_sec:
            return cached[1]
        from metal_guard.forensics.gate import evaluate_panic_cooldown

        verdict = evaluate_panic_cooldown()
        self._gate = (now, verdict)
        return verdict

    def _refusal(self, ident: str) -> BaseException | None:
        """The error to refuse this call with, or ``None``."""
        from metal_guard.errors import ModelDoesNotFitError, PanicCooldownActive

        verdict = self._gate_verdict()
        if verdict.exit_code == 2:
            return PanicCooldownActive(verdict)
        from metal_guard import memory

        stats = memory.memory_stats(load=False)
        if self._critical(stats):
            from metal_guard._policy_steps import light_cleanup

            light_cleanup()
            stats = memory.memory_stats(load=False)
            if self._critical(stats):
                return ModelDoesNotFitError(
                    f"memory is critical before the LangChain call to {ident} "
                    f"({stats.describe()}); refused", model_name=ident,
                    available_bytes=stats.available_bytes)
        return None

    def _critical(self, stats: Any) -> bool:
        if stats.pressure == "critical":
            return True
        pct = stats.used_pct
        return pct is not None and pct >= self.critical_used_pct

    def _start(self, serialized: dict[str, Any] | None, run_id: UUID, kwargs: dict[str, Any]) -> None:
        ident = _identify(serialized, kwargs)
        with self._lock:
            self._runs[run_id] = (time.monotonic(), ident)
        self._add(ident, calls=1)
        try:
            refusal = self._refusal(ident)
        except Exception as exc:  # a broken check never blocks the call
            log.warning("metal-guard LangChain start check failed (%s: %s); proceeding",
                        type(exc).__name__, exc)
            return
        if refusal is None:
            return
        from metal_guard.policy import hot_settings

        blocks = (self.veto == "all" or (self.veto == "local" and _is_local(ident)))
        if blocks and hot_settings().is_defensive:
            with self._lock:
                self._runs.pop(run_id, None)
            self._add(ident, refused=1)
            _crumb("LANGCHAIN_REFUSED", ident, error=type(refusal).__name__, detail=str(refusal)[:200])
            raise refusal
        _crumb("OBSERVE", f"LangChain call to {ident} would be refused: {refusal}"[:300])
        log.warning("metal-guard: %s (not refused: %s)", refusal,
                    "observer mode" if blocks else "not a local-GPU model")

    # ------------------------------------------------------------------ LangChain events

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID,
                     **kwargs: Any) -> None:
        self._start(serialized, run_id, kwargs)

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[Any]], *,
                            run_id: UUID, **kwargs: Any) -> None:
        self._start(serialized, run_id, kwargs)

    def on_llm_new_token(self, token: Any, *, run_id: UUID, **kwargs: Any) -> None:
        with self._lock:
            run = self._runs.get(run_id)
        if run is not None:
            self._add(run[1], streamed_tokens=1)

    def _finish(self, run_id: UUID, ok: bool, **extra: float) -> tuple[str, float] | None:
        with self._lock:
            run = self._runs.pop(run_id, None)
        if run is None:
            return None
        elapsed = time.monotonic() - run[0]
        outcome = {"completed": 1} if ok else {"failed": 1}
        self._add(run[1], total_sec=elapsed, max_sec=elapsed, **outcome, **extra)
        with self._lock:
            self._last = {"llm": run[1], "ok": ok, "elapsed_sec": round(elapsed, 6), **extra}
        return run[1], elapsed

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            usage = _usage(response)
        except Exception:
            usage = {}
        self._finish(run_id, True, **usage)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        done = self._finish(run_id, False)
        try:
            from metal_guard.classify import classify_mlx_error

            cls = classify_mlx_error(error)
        except Exception:
            cls = None
        name = cls.name if cls is not None else "other"
        with self._lock:
            self._errors[name] = self._errors.get(name, 0) + 1
        ident = done[0] if done else "unknown-llm"
        _crumb("LANGCHAIN_ERROR", ident, error=type(error).__name__, error_class=name,
               detail=str(error)[:200])
        if cls is not None:
            log.warning("LangChain call to %s failed: %s [%s, %s; recovery: %s]", ident, error,
                        cls.name, cls.severity, cls.recovery_hint)


def _usage(response: Any) -> dict[str, float]:
    """Prompt/completion token counts from an ``LLMResult`` when the model reports them."""
    output = getattr(response, "llm_output", None) or {}
    usage = output.get("token_usage") or output.get("usage") or {}
    prompt = usage.get("prompt_tokens") or usage.get("input_tokens")
    completion = usage.get("completion_tokens") or usage.get("output_tokens")
    if prompt is None and completion is None:
        for gens in getattr(response, "generations", None) or []:
            for gen in gens:
                meta = getattr(getattr(gen, "message", None), "usage_metadata", None) or {}
                prompt = (prompt or 0) + int(meta.get("input_tokens", 0) or 0) if meta else prompt
                completion = (completion or 0) + int(meta.get("output_tokens", 0) or 0) if meta else completion
    out: dict[str, float] = {}
    if prompt:
        out["prompt_tokens"] = int(prompt)
    if completion:
        out["completion_tokens"] = int(completion)
    return out
