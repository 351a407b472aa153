"""Rebinding aliases: module globals that still hold an object ``install()`` replaced.

``install()`` after the user's import wraps a function where it is defined, but other modules
may already hold the original under their own name (``mlx_lm.server.stream_generate``, the
``mlx_lm.generate`` package attribute, a user's ``from mlx_lm import generate``). The sweep
finds those globals by identity and rebinds them; ``uninstall()`` runs it the other way round.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

#: Modules never swept for user aliases (our own, wrapt's, the boot module's).
SKIP_PREFIXES = ("metal_guard", "wrapt", "_metal_guard_boot")


def sweep(pairs: dict[int, tuple[Any, Any]], packages: tuple[str, ...] | None) -> list[str]:
    """Rebind module globals that are (``is``) a key object to its replacement; return
    ``"module:name"`` of each one rebound.

    ``pairs`` maps ``id(old) -> (old, new)``. ``packages`` limits the sweep to those packages
    and their submodules; ``None`` sweeps every module except :data:`SKIP_PREFIXES` (user
    aliases).
    """
    rebound: list[str] = []
    prefixes = tuple(p + "." for p in packages) if packages is not None else ()
    for mod_name, module in list(sys.modules.items()):
        if not isinstance(module, ModuleType):
            continue
        if packages is not None:
            if mod_name not in packages and not mod_name.startswith(prefixes):
                continue
        elif mod_name.startswith(SKIP_PREFIXES):
            continue
        try:
            namespace = vars(module)
        except TypeError:
            continue
        for key, value in list(namespace.items()):
            pair = pairs.get(id(value))
            if pair is not None and pair[0] is value:
                try:
                    setattr(module, key, pair[1])
                except (AttributeError, TypeError):
                    continue
                rebound.append(f"{mod_name}:{key}")
    return rebound
