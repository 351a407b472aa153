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

* a watched module run as a script (``python -m mlx_lm.server``, ``runpy.run_module``) never
  goes through ``exec_module``: runpy compiles it and executes the code in ``__main__``'s
  namespace. While hooks are registered, ``runpy._run_code`` is wrapped: for a watched module it
  runs the module body up to its first top-level ``if __name__ == "__main__":`` block, calls the
  hooks with the ``__main__`` module (its ``__spec__.name`` is the real name, see
  :func:`module_name`), then runs that block — so the classes and functions the block uses are
  guarded before it calls them. Without source to split (a sourceless ``.pyc``) the module runs
  unguarded with one warning.

Hooks run outside this module's lock. An exception raised by a hook propagates into the import
that triggered it (the adapter layer catches everything except what ``strict=True`` wants to
raise).
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["is_watching", "module_name", "register", "runpy_guarded", "unregister", "watched"]

log = logging.getLogger("metal_guard.import_hooks")

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


def module_name(module: ModuleType) -> str:
    """The name a module was imported or run under: ``__spec__.name`` for a module run as
    ``__main__`` by runpy (``python -m mlx_lm.server`` -> ``"mlx_lm.server"``), else ``__name__``."""
    name = module.__name__
    if name == "__main__":
        real = getattr(getattr(module, "__spec__", None), "name", None)
        if isinstance(real, str) and real:
            return real
    return name


def _fire(module: ModuleType, name: str | None = None) -> None:
    with _lock:
        hooks = list(_hooks.get(name or module.__name__, ()))
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
        _runpy_patch()
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
            _runpy_unpatch()


def watched() -> list[str]:
    """The module names that currently have hooks (for reports and tests)."""
    with _lock:
        return sorted(_hooks)


def is_watching() -> bool:
    """True while the finder sits in ``sys.meta_path``."""
    return _finder in sys.meta_path


# --------------------------------------------------------------------------- python -m

_runpy_original: Any = None  # runpy._run_code while ours is installed over it


def runpy_guarded() -> bool:
    """True while ``runpy._run_code`` is wrapped (watched modules run as ``__main__`` are hooked)."""
    return _runpy_original is not None


def _runpy_patch() -> None:
    """Wrap ``runpy._run_code`` (called under ``_lock``). runpy is imported here if needed: it is
    part of the stdlib, frozen, and ``python -m`` has always imported it already."""
    global _runpy_original
    if _runpy_original is not None:  # ours is in runpy's chain (on top, or under another tool's)
        return
    try:
        import runpy
    except ImportError:  # pragma: no cover - a stripped interpreter
        return
    original = getattr(runpy, "_run_code", None)
    if original is None:
        log.warning("runpy._run_code is missing on this Python: modules run with 'python -m' are "
                    "not guarded")
        return
    _runpy_original = original
    setattr(runpy, "_run_code", _run_code)  # noqa: B010 - a private name mypy does not know


def _runpy_unpatch() -> None:
    global _runpy_original
    runpy = sys.modules.get("runpy")
    if runpy is not None and getattr(runpy, "_run_code", None) is _run_code and _runpy_original:
        setattr(runpy, "_run_code", _runpy_original)  # noqa: B010
        _runpy_original = None
    # else: another tool wrapped ours; ours stays below it, inert while nothing is watched


def _run_code(code: Any, run_globals: dict[str, Any], init_globals: Any = None,
              mod_name: Any = None, mod_spec: Any = None, *args: Any, **kwargs: Any) -> Any:
    """``runpy._run_code`` for a watched module: body, hooks, then the ``__main__`` block."""
    original = _runpy_original
    if original is None:  # pragma: no cover - unpatched while a call was starting
        import runpy

        original = getattr(runpy, "_run_code")  # noqa: B009
        if original is _run_code:
            raise RuntimeError("metal-guard: runpy._run_code lost its original")
    name = getattr(mod_spec, "name", None)
    with _lock:
        watched = isinstance(name, str) and name in _hooks
    if not watched or not isinstance(name, str):
        return original(code, run_globals, init_globals, mod_name, mod_spec, *args, **kwargs)
    loader = getattr(mod_spec, "loader", None)
    if isinstance(loader, _ChainedLoader):  # found through our finder: the module never sees it
        mod_spec.loader = loader = loader._mg_loader
    parts = _split_main(loader, name, code)
    if parts is None:
        import warnings

        warnings.warn(f"metal-guard: {name} run as a script is NOT guarded (no source to split "
                      f"off its __main__ block); import it from a script instead", RuntimeWarning,
                      stacklevel=2)
        return original(code, run_globals, init_globals, mod_name, mod_spec, *args, **kwargs)
    body, main_block = parts
    result = original(body, run_globals, init_globals, mod_name, mod_spec, *args, **kwargs)
    module = _module_of(run_globals, mod_name)
    if module is None:
        import warnings

        warnings.warn(f"metal-guard: {name} run into a bare namespace is NOT guarded",
                      RuntimeWarning, stacklevel=2)
    else:
        _fire(module, name)
    if main_block is not None:
        exec(main_block, run_globals)
    return result


def _module_of(namespace: dict[str, Any], mod_name: Any) -> ModuleType | None:
    for key in (mod_name, "__main__"):
        module = sys.modules.get(key) if isinstance(key, str) else None
        if module is not None and getattr(module, "__dict__", None) is namespace:
            return module
    return None


def _is_main_guard(node: Any) -> bool:
    import ast

    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    test = node.test
    if len(test.ops) != 1 or not isinstance(test.ops[0], ast.Eq):
        return False
    sides = (test.left, test.comparators[0])
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(consts) == 1


def _split_main(loader: Any, name: str, code: Any) -> tuple[Any, Any] | None:
    """``(body, main_block)`` code objects for ``name``: the module up to its first top-level
    ``if __name__ == "__main__":`` and the rest (``None`` when there is no such block: the
    original code is the body). ``None`` without source."""
    import ast

    try:
        source = loader.get_source(name)
    except Exception as exc:
        log.debug("no source for %s: %s", name, exc)
        return None
    if not isinstance(source, str):
        return None
    filename = getattr(code, "co_filename", None) or f"<{name}>"
    tree = ast.parse(source, filename)
    cut = next((i for i, node in enumerate(tree.body) if _is_main_guard(node)), None)
    if cut is None:
        return code, None
    import __future__

    flags = 0
    for node in tree.body[:cut]:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            for alias in node.names:
                feature = getattr(__future__, alias.name, None)
                flags |= getattr(feature, "compiler_flag", 0)
    body = ast.Module(body=tree.body[:cut], type_ignores=[])
    tail = ast.Module(body=tree.body[cut:], type_ignores=[])
    return (compile(body, filename, "exec", dont_inherit=True),
            compile(tail, filename, "exec", flags=flags, dont_inherit=True))


def after_fork_in_child() -> None:
    """Called by ``install``'s fork handler: the parent's lock may be held by a dead thread."""
    global _lock, _local
    _lock = threading.RLock()
    _local = threading.local()
