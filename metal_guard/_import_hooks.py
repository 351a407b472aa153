"""Post-import hooks, stdlib only (no wrapt): run a callback right after a module executes.

:func:`metal_guard.install` must not import wrapt, an adapter or MLX until a target module is
imported, so it cannot use ``wrapt.register_post_import_hook``. This module is the small
replacement it needs:

* a finder at ``sys.meta_path[0]`` that, for a watched module name only, asks the other finders
  for the real spec and wraps its loader so that ``exec_module`` calls the hooks right after the
  module body ran — before the importer (e.g. a package ``__init__`` doing
  ``from .generate import generate``) reads any name from it;
* hooks stay registered until removed (unlike wrapt's, which fire once and cannot be removed), so
  ``importlib.reload`` re-applies them and ``uninstall()`` can take them back;
* a hook registered for a module that is already imported runs at once, in the caller's thread
  (after waiting for another thread that is still executing that module).

Hooks run outside this module's lock. An exception raised by a hook propagates into the import
that triggered it (the adapter layer catches everything except what ``strict=True`` wants to
raise).
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["is_watching", "register", "unregister", "watched"]

Hook = Callable[[ModuleType], None]

_lock = threading.RLock()
_hooks: dict[str, list[Hook]] = {}
_local = threading.local()


def _busy() -> set[str]:
    busy: set[str] | None = getattr(_local, "busy", None)
    if busy is None:
        busy = _local.busy = set()
    return busy


class _ChainedLoader:
    """Delegates to the real loader; calls the hooks after ``exec_module``."""

    def __init__(self, loader: Any) -> None:
        self._mg_loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mg_loader, name)

    def create_module(self, spec: Any) -> Any:
        create = getattr(self._mg_loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        # Put the real loader back first, so code in the module (importlib.resources, inspect)
        # never sees this proxy.
        if getattr(module, "__loader__", None) is self:
            try:
                module.__loader__ = self._mg_loader
            except AttributeError:  # pragma: no cover - exotic module types
                pass
        spec = getattr(module, "__spec__", None)
        if spec is not None and getattr(spec, "loader", None) is self:
            spec.loader = self._mg_loader
        self._mg_loader.exec_module(module)
        _fire(module)


class _Finder:
    """Watches the registered module names; stays out of every other import."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in _hooks:  # the fast path for every unrelated import
            return None
        busy = _busy()
        if fullname in busy:
            return None
        busy.add(fullname)
        try:
            spec = None
            for finder in list(sys.meta_path):
                if finder is self or isinstance(finder, _Finder):
                    continue
                find = getattr(finder, "find_spec", None)
                if find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        finally:
            busy.discard(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or isinstance(loader, _ChainedLoader) or not hasattr(loader, "exec_module"):
            return spec  # None (not found), a namespace package, or a legacy loader: leave it be
        spec.loader = _ChainedLoader(loader)  # type: ignore[union-attr]
        return spec

    def __repr__(self) -> str:
        return "<metal_guard post-import hook finder>"


_finder = _Finder()


def _fire(module: ModuleType) -> None:
    with _lock:
        hooks = list(_hooks.get(module.__name__, ()))
    for hook in hooks:
        hook(module)


def register(name: str, hook: Hook) -> None:
    """Call ``hook(module)`` after ``name`` executes (now, if it is already imported)."""
    with _lock:
        _hooks.setdefault(name, []).append(hook)
        if _finder not in sys.meta_path:
            # Inserting at the front during an import being resolved is harmless: the running
            # loop over sys.meta_path sees one finder twice, it never skips one.
            sys.meta_path.insert(0, _finder)
        module = sys.modules.get(name)
    if module is None:
        return
    if getattr(getattr(module, "__spec__", None), "_initializing", False):
        # Another thread is executing the module right now, through a loader we did not chain:
        # importing it waits on the module's import lock until it is complete.
        try:
            module = importlib.import_module(name)
        except Exception:
            return  # its import failed: nothing to hook
    hook(module)


def unregister(name: str, hook: Hook) -> None:
    """Forget ``hook`` for ``name``; drop the finder once nothing is watched."""
    with _lock:
        hooks = _hooks.get(name)
        if hooks is not None:
            try:
                hooks.remove(hook)
            except ValueError:
                pass
            if not hooks:
                del _hooks[name]
        if not _hooks:
            try:
                sys.meta_path.remove(_finder)
            except ValueError:
                pass


def watched() -> list[str]:
    """The module names that currently have hooks (for reports and tests)."""
    with _lock:
        return sorted(_hooks)


def is_watching() -> bool:
    """True while the finder sits in ``sys.meta_path``."""
    return _finder in sys.meta_path


def after_fork_in_child() -> None:
    """Called by ``install``'s fork handler: the parent's lock may be held by a dead thread."""
    global _lock, _local
    _lock = threading.RLock()
    _local = threading.local()
