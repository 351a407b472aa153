"""A real in-process ``mlx_lm.server`` on 127.0.0.1 for the server tests (tiny model, CPU MLX).

The server is the library's own ``ModelProvider`` / ``ResponseGenerator`` / ``APIHandler`` on a
``ThreadingHTTPServer`` bound to 127.0.0.1 — only the argparse step of ``main()`` is skipped.
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path
from typing import Any

from mlx_lm import server
from support import HttpClient, wait_for

from metal_guard.adapters import _server_http as http

__all__ = ["Outcome", "Server", "metric", "module_server", "queued_request", "server_args",
           "wait_for"]


def server_args(model: Path | None, **over: Any) -> argparse.Namespace:
    """The Namespace ``mlx_lm.server.main()`` would build (0.32.2 defaults)."""
    values: dict[str, Any] = dict(
        model=str(model) if model is not None else None, adapter_path=None, draft_model=None,
        num_draft_tokens=3, trust_remote_code=False, chat_template="",
        use_default_chat_template=False, temp=0.0, top_p=1.0, top_k=0, min_p=0.0, max_tokens=16,
        chat_template_args={}, decode_concurrency=32, prompt_concurrency=8,
        prefill_step_size=2048, prompt_cache_size=10, prompt_cache_bytes=None, kv_bits=None,
        kv_group_size=64, quantized_kv_start=5000, pipeline=False, allowed_origins=["*"],
        host="127.0.0.1", port=0, log_level="INFO")
    values.update(over)
    return argparse.Namespace(**values)


class Server(HttpClient):
    def __init__(self, model: Path | None, **over: Any) -> None:
        from http.server import ThreadingHTTPServer

        self.provider = server.ModelProvider(server_args(model, **over))
        self.generator = server.ResponseGenerator(
            self.provider, server.LRUPromptCache(self.provider.cli_args.prompt_cache_size))
        self.httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), lambda *a, **k: server.APIHandler(self.generator, *a, **k))
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def complete(self, prompt: str = "hello there", **extra: Any) -> tuple[int, dict[str, Any]]:
        return self.post("/v1/completions", {"prompt": prompt, "max_tokens": 4, **extra})

    def status(self) -> dict[str, Any]:
        code, _h, raw = self.request("/metal-guard/status")
        assert code == 200, raw
        return json.loads(raw)  # type: ignore[no-any-return]

    def metrics(self) -> str:
        code, _h, raw = self.request("/metrics")
        assert code == 200, raw
        return raw.decode()

    def state(self) -> http.ServerState:
        return http.state_for(self.provider)

    def openai(self, **kw: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.base + "/v1", api_key="not-needed",
                             max_retries=kw.pop("max_retries", 0), timeout=kw.pop("timeout", 60.0), **kw)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.generator.stop_and_join()


class Outcome(threading.Event):
    """Set when a background call ended; ``result`` is its return value or exception."""

    result: Any = None


def queued_request(srv: Server, model: Path, prompt: str = "queued", max_tokens: int = 2) -> Outcome:
    """Put a completion request straight into the generation thread's queue from a background
    thread, the way a handler that passed metal-guard's readiness check a moment earlier does
    (``ResponseGenerator.generate`` without the adapter's wrapper)."""
    from metal_guard.adapters.base import find_guard

    site = vars(server.ResponseGenerator)["generate"]
    guard = find_guard(site)
    raw = guard.__wrapped__ if guard is not None else site
    request = server.CompletionRequest(request_type="text", prompt=prompt, messages=[], tools=None,
                                       role_mapping=None)
    args = server.GenerationArguments(
        model=server.ModelDescription(model=str(model), draft=None, adapter=None),  # type: ignore[arg-type]
        sampling=server.SamplingArguments(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
                                          xtc_probability=0.0, xtc_threshold=0.0),
        logits=server.LogitsProcessorArguments(
            logit_bias=None, repetition_penalty=0.0, repetition_context_size=20,
            presence_penalty=0.0, presence_context_size=20, frequency_penalty=0.0,
            frequency_context_size=20),
        stop_words=[], max_tokens=max_tokens, num_draft_tokens=3, logprobs=False, top_logprobs=0,
        seed=None, chat_template_kwargs=None)
    outcome = Outcome()

    def call() -> None:
        try:
            ctx, tokens = raw(srv.generator, request, args)
            outcome.result = (ctx, list(tokens))
        except BaseException as exc:  # reported to the test
            outcome.result = exc
        finally:
            outcome.set()

    threading.Thread(target=call, daemon=True).start()
    return outcome


def metric(text: str, name: str) -> float | None:
    """The value of an unlabelled sample ``name`` in Prometheus text, else ``None``."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def module_server(model: Path | None, **over: Any) -> Server:
    """A server for a whole test module: started while metal-guard is installed (so its
    generation thread runs under the adapter's supervisor), then uninstalled again so the
    per-test leak check stays meaningful; tests install around their own requests."""
    from metal_guard import installer as mg

    mg.install()
    try:
        srv = Server(model, **over)
        try:
            wait_for(lambda: srv.state().phase == "ready", what="the server to be ready")
        except BaseException:
            srv.close()  # never leave a generation thread behind (it would keep pytest alive)
            raise
    finally:
        mg.uninstall()
    return srv
