"""LangChain's ChatMLX, guarded by metal-guard (langchain-community + mlx-lm >= 0.32).

    python examples/langchain_chat.py [MODEL]

``metal_guard.install()`` guards ``ChatMLX`` / ``MLXPipeline`` calls with the object's model id,
fixes langchain-community 0.4.2's MLX classes against current mlx-lm (``invoke`` and ``stream``
are broken there without it), and adds a callback handler to every LangChain model call: it
refuses local-GPU calls during a panic cooldown or at critical memory, classifies errors and
keeps per-call statistics. Needs ``pip install langchain-community``.
"""

from __future__ import annotations

import json
import sys
import warnings

import metal_guard

metal_guard.install()

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # langchain-community's sunset notice
    from langchain_community.chat_models.mlx import ChatMLX
    from langchain_community.llms.mlx_pipeline import MLXPipeline
from langchain_core.messages import HumanMessage, SystemMessage  # noqa: E402


def default_model() -> str:
    from metal_guard.tinymodel import default_dir, ensure_tiny_lm

    return str(ensure_tiny_lm(default_dir("lm")))


def main() -> int:
    model_path = sys.argv[1] if len(sys.argv) > 1 else default_model()
    try:
        llm = MLXPipeline.from_model_id(model_path, pipeline_kwargs={"max_tokens": 24})
    except metal_guard.MetalGuardError as exc:
        print(f"metal-guard refused the load: {exc}", file=sys.stderr)
        return 75
    chat = ChatMLX(llm=llm)
    messages = [SystemMessage(content="You are terse."), HumanMessage(content="Name a GPU.")]

    reply = chat.invoke(messages)
    print(f"invoke: {reply.content!r}")
    chunks = [chunk.content for chunk in chat.stream(messages)]
    print(f"stream: {len(chunks)} chunks, {''.join(map(str, chunks))!r}")

    from metal_guard.adapters.langchain import callback_handler

    totals = callback_handler().stats()["total"]
    print("metal-guard LangChain stats:", json.dumps(
        {k: totals[k] for k in ("calls", "completed", "failed", "refused", "streamed_tokens")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
