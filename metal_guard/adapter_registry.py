"""The adapter registry: which adapters exist, what imports trigger them, which are selected.

A row (:class:`AdapterInfo`) names the adapter module, the library modules that *define* its
targets (the post-import hooks are registered on those) and the packages its alias sweep may
touch. ``install()`` (:mod:`metal_guard.installer`) reads :data:`REGISTRY` and asks
:func:`select_adapters` which rows the settings enable. Importing this module imports no adapter.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from metal_guard.errors import SettingsError

__all__ = ["REGISTRY", "AdapterInfo", "normalise_names", "register_adapter", "select_adapters"]


@dataclass(frozen=True)
class AdapterInfo:
    """A registry row. ``triggers`` are the modules that define the adapter's targets (its
    ``TARGETS[i].module``); ``packages`` bound the alias sweep."""

    name: str
    module: str
    triggers: tuple[str, ...]
    packages: tuple[str, ...]
    summary: str = ""
    #: What this adapter knowingly does not guard (shown by ``adapter_report()`` and doctor).
    limitations: tuple[str, ...] = ()


#: The adapters metal-guard ships. Add a row (or call :func:`register_adapter`) for a new one.
REGISTRY: dict[str, AdapterInfo] = {
    info.name: info
    for info in (
        AdapterInfo("mlx_lm", "metal_guard.adapters.mlx_lm", ("mlx_lm.utils", "mlx_lm.generate"),
                    ("mlx_lm",), "mlx_lm load / generate / stream_generate / batch generation"),
        AdapterInfo("mlx_lm_server", "metal_guard.adapters.mlx_lm_server", ("mlx_lm.server",),
                    ("mlx_lm",), "mlx_lm.server model switching, 503 on OOM, status routes"),
        AdapterInfo("mlx_vlm", "metal_guard.adapters.mlx_vlm",
                    ("mlx_vlm.utils", "mlx_vlm.generate.dispatch"), ("mlx_vlm",),
                    "mlx_vlm load / generate / stream_generate"),
        AdapterInfo("mlx_vlm_server", "metal_guard.adapters.mlx_vlm_server",
                    ("mlx_vlm.server.generation", "mlx_vlm.server.app"), ("mlx_vlm",),
                    "mlx_vlm.server status routes, 503 on OOM (non-streaming)",
                    ("SSE streams: an OOM after the first byte keeps mlx_vlm's own error event (no 503)",
                     "the continuous-batching generation thread is not supervised or restarted",
                     "model switches are guarded by the mlx_vlm load policy, without a switch-time "
                     "cadence wait")),
        AdapterInfo("langchain", "metal_guard.adapters.langchain",
                    ("langchain_community.llms.mlx_pipeline", "langchain_community.chat_models.mlx",
                     "langchain_core.callbacks.manager"),
                    ("langchain_community",), "LangChain MLXPipeline / ChatMLX + callback handler"),
    )
}


def register_adapter(info: AdapterInfo, *, replace: bool = False) -> None:
    """Add an adapter to the registry (takes effect at the next ``install()``)."""
    if info.name in REGISTRY and not replace:
        raise ValueError(f"adapter {info.name!r} is already registered")
    REGISTRY[info.name] = info


def select_adapters(settings: Any, explicit: bool) -> tuple[list[str], list[str]]:
    """``(enabled, disabled)`` adapter names, in registry order, for ``settings.adapters`` /
    ``settings.disabled_adapters`` (``"*"`` disables all). An unknown name is a
    :class:`SettingsError` naming the keyword (``explicit``) or the variable it came from."""
    known = set(REGISTRY)
    requested = set(settings.adapters) if settings.adapters is not None else known
    disabled = set(settings.disabled_adapters)
    for label, names in (("adapters", requested), ("disabled_adapters", disabled - {"*"})):
        unknown = names - known
        if unknown:
            raise SettingsError(label if explicit else f"METALGUARD_{label.upper()}",
                                ",".join(sorted(unknown)), "adapter names among " + ", ".join(sorted(known)))
    if "*" in disabled:
        disabled = known
    enabled = [n for n in REGISTRY if n in requested and n not in disabled]
    return enabled, [n for n in REGISTRY if n not in enabled]


def normalise_names(names: Iterable[str] | None) -> frozenset[str] | None:
    """Adapter names as given to ``install()`` (an iterable or a comma-separated string),
    lower-cased with ``-`` spelled ``_``; ``None`` stays ``None`` (not given)."""
    if names is None:
        return None
    if isinstance(names, str):
        names = names.split(",")
    return frozenset(n.strip().lower().replace("-", "_") for n in names if n.strip())
