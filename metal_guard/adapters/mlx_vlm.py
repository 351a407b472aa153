"""Adapter for ``mlx_vlm`` (0.7): model loading, single and streamed generation.

=============================================  =========  ========================================
site                                           policy     what the policy sees
=============================================  =========  ========================================
``mlx_vlm.utils:load``                         load       model id = the path or repo; local dir
``mlx_vlm.generate.dispatch:generate``         generate   model (its id from the guarded load),
                                                          prompt tokens when given as tokens,
                                                          number of images
``mlx_vlm.generate.dispatch:stream_generate``  generate   same, applied per resumption
=============================================  =========  ========================================

The same guards as the ``mlx_lm`` adapter: panic gate, breaker, registry, fit check, cadence and
lock on load; OOM protection, inference counting, periodic flush, prefill guard and the memory
heartbeat on generation. ``generate`` iterates ``stream_generate`` through the module's globals;
the depth guard applies the policy once. The package re-exports (``mlx_vlm.generate`` the
function, ``mlx_vlm.load``) and the aliases in ``mlx_vlm.server.*`` bind the wrapper (install
before the import) or are rebound by ``install()``'s package sweep (install after it).
Nothing here imports ``mlx_vlm``.
"""

from __future__ import annotations

from typing import Any

from metal_guard.adapters.base import Target
from metal_guard.adapters.mlx_lm import _arg, _tokens, describe_load
from metal_guard.policy import CallInfo, model_id_of

NAME = "mlx_vlm"
#: The mlx-vlm releases this adapter was written and tested for (see ``install_report``).
INSTRUMENTS = ("mlx-vlm>=0.7,<0.8",)


def describe_vlm_load(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallInfo:
    info = describe_load(instance, args, kwargs)
    info.site = "mlx_vlm.utils:load"
    return info


def _count(media: Any) -> int:
    if media is None:
        return 0
    return len(media) if isinstance(media, (list, tuple)) else 1


def describe_vlm_generate(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallInfo:
    model = _arg(args, kwargs, 0, "model")
    prompt = _arg(args, kwargs, 2, "prompt")
    info = CallInfo("mlx_vlm.generate", model=model, model_id=model_id_of(model),
                    prompt_tokens=_tokens(prompt))
    images = _count(_arg(args, kwargs, 3, "image"))
    if images:
        info.extra["images"] = images
    return info


TARGETS: tuple[Target, ...] = (
    Target("mlx_vlm.utils", "load", "load", describe_vlm_load),
    Target("mlx_vlm.generate.dispatch", "generate", "generate", describe_vlm_generate),
    Target("mlx_vlm.generate.dispatch", "stream_generate", "generate", describe_vlm_generate),
)
