"""``install()`` / ``uninstall()`` / ``is_installed()`` / ``adapter_report()``.

The adapters it can install are rows of :mod:`metal_guard.adapter_registry` (re-exported
here); the alias sweep is :mod:`metal_guard._alias_sweep`; the report and its announce line are
:mod:`metal_guard.install_report`.

``install()`` registers post-import hooks (:mod:`metal_guard._import_hooks`, stdlib only) on the
modules that *define* each adapter's targets, so it works before or after the user's imports:

* **before** the import, the hook wraps e.g. ``mlx_lm.generate.stream_generate`` right after that
  module ran and before ``mlx_lm/__init__`` or ``mlx_lm/server.py`` copy the name, so every
  re-export binds the wrapper;
* **after** the import, the hook runs at once and a sweep of the library's own package rebinds
  module globals that still hold the original (``mlx_lm.generate`` the package attribute,
  ``mlx_lm.server.stream_generate``, ...). Aliases in *user* modules are rebound only with
  ``rebind_aliases=True`` (``METALGUARD_REBIND_ALIASES=1``).

Nothing is imported by ``install()`` itself — not wrapt, not an adapter, not MLX — until a target
module is imported. The adapter module (and wrapt) is imported by the hook, outside the lock.

Every wrapper is a :class:`metal_guard.adapters.base.GuardWrapper`; a second ``install()`` finds
it in the chain and adds nothing. ``uninstall()`` splices ours out with ``wrapt.unwrap_object``
(a foreign wrapt wrapper on top survives), restores every module global that holds one of ours,
removes the hooks and bumps a generation counter so a hook already running does nothing.
A wrapper that cannot be removed (a non-wrapt wrapper sits on top) stays in place, inert.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from metal_guard import _import_hooks
from metal_guard._alias_sweep import sweep
from metal_guard.adapter_registry import (
    REGISTRY,
    AdapterInfo,
    normalise_names,
    register_adapter,
    select_adapters,
)
from metal_guard.errors import AdapterError
from metal_guard.install_report import (
    AdapterState,
    AdapterStatus,
    InstallReport,
    announce_line,
    check_requirements,
)

log = logging.getLogger("metal_guard.installer")

__all__ = [
    "REGISTRY", "AdapterInfo", "adapter_report",
    "install", "is_installed", "register_adapter", "uninstall",
]

PENDING, PATCHED, DEGRADED, FAILED, DISABLED = (
    AdapterState.PENDING, AdapterState.PATCHED, AdapterState.DEGRADED, AdapterState.FAILED,
    AdapterState.DISABLED,
)


# --------------------------------------------------------------------------- state


@dataclass
class _Site:
    owner: ModuleType
    path: str
    handle: Any  # GuardWrapper


@dataclass
class _AdapterState:
    info: AdapterInfo
    state: AdapterState = PENDING
    reason: str = ""
    sites: dict[str, _Site] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    modules: set[str] = field(default_factory=set)
    requires: list[str] = field(default_factory=list)
    versions: dict[str, str | None] | None = None  # None: not checked yet
    untested: list[str] = field(default_factory=list)

    def degraded_reason(self) -> str:
        parts = list(self.untested)
        if self.missing:
            parts.append("targets not found: " + ", ".join(self.missing))
        return "; ".join(parts)


@dataclass
class _State:
    generation: int
    options: dict[str, Any]
    settings: Any
    source: str
    adapters: dict[str, _AdapterState]
    hooks: list[tuple[str, Any]] = field(default_factory=list)


_lock = threading.RLock()
_state: _State | None = None
_generation = 0
_last_skip: str = ""
_fork_registered = False
_announced = False  # the METALGUARD_ANNOUNCE line was written (once per process)


def _register_fork_handlers() -> None:
    global _fork_registered
    if _fork_registered or not hasattr(os, "register_at_fork"):
        return
    _fork_registered = True
    os.register_at_fork(before=lambda: _lock.acquire(), after_in_parent=lambda: _lock.release(),
                        after_in_child=_after_fork_in_child)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()  # never release the parent's: its owner does not exist here
    _import_hooks.after_fork_in_child()
    from metal_guard import policy

    policy.after_fork_in_child()


# --------------------------------------------------------------------------- public API


def install(
    *,
    adapters: Iterable[str] | None = None,
    disabled_adapters: Iterable[str] | None = None,
    strict: bool | None = None,
    rebind_aliases: bool | None = None,
    **options: Any,
) -> InstallReport:
    """Guard MLX libraries now and whenever they are imported later. Returns :func:`adapter_report`.

    ``adapters`` / ``disabled_adapters`` select adapters (default: all; ``"*"`` disables all);
    ``strict=True`` raises :class:`~metal_guard.errors.AdapterError` when a requested adapter
    cannot guard fully — its targets moved, or the library's version is outside the range the
    adapter was written for (otherwise it is marked degraded, still guards what it can, and
    warns once); ``rebind_aliases=True`` also rebinds aliases held by user modules.
    ``options`` are the guard options of :mod:`metal_guard.options` (``mode``, ``gate``,
    ``cadence``, ``fit_check``, ``use_lock``, ``flush_every_n``, ...), the same keys as
    ``guard_policy()`` and ``@guarded_generate()``; an unknown one is a ``TypeError``.
    The environment supplies what is not given (``METALGUARD_ADAPTERS``, ``..._STRICT``, ...);
    ``METALGUARD_DISABLED=1`` beats everything: nothing is installed.
    Calling it again while installed changes nothing (a warning if the options differ).
    """
    return _install("code", adapters, disabled_adapters, strict, rebind_aliases, options)


def uninstall() -> bool:
    """Remove every metal-guard wrapper and hook; ``False`` if nothing was installed."""
    global _state, _generation
    with _lock:
        state = _state
        if state is None:
            return False
        _state = None
        _generation += 1
        from metal_guard import policy

        policy.ACTIVATION.generation = 0
    for name, hook in state.hooks:
        _import_hooks.unregister(name, hook)
    with _lock:
        guards: dict[int, tuple[Any, Any]] = {}
        for ad in state.adapters.values():
            for site in reversed(list(ad.sites.values())):
                guards[id(site.handle)] = (site.handle, site.handle.__wrapped__)
                from metal_guard.adapters.base import unwrap_site

                unwrap_site(site.owner, site.path, site.handle)
        if guards:
            sweep(guards, None)
    for ad in state.adapters.values():
        if ad.state in (PATCHED, DEGRADED):
            _call_adapter_hook(ad.info, "on_unpatched")
    policy.configure(None)
    log.info("metal-guard uninstalled")
    return True


def is_installed() -> bool:
    return _state is not None


def adapter_report() -> InstallReport:
    """Installation state and, per adapter, an :class:`AdapterStatus`: its ``state``
    (:class:`AdapterState`), the guarded ``sites``, ``missing`` targets, rebound ``aliases``,
    the version ranges it ``requires`` and the installed ``versions``, and the ``reason``."""
    with _lock:
        state = _state
        rows: dict[str, AdapterStatus] = {}
        for name, info in REGISTRY.items():
            ad = state.adapters.get(name) if state else None
            if ad is None:
                rows[name] = AdapterStatus(
                    name, DISABLED, "not installed" if state is None else "registered after install()",
                    info.summary, limitations=list(info.limitations))
                continue
            rows[name] = AdapterStatus(
                name, ad.state, ad.reason, info.summary, sorted(ad.sites), list(ad.missing),
                list(ad.aliases), sorted(ad.modules), list(info.limitations), list(ad.requires),
                dict(ad.versions or {}), list(ad.untested))
        return InstallReport(
            installed=state is not None,
            generation=state.generation if state else None,
            source=state.source if state else None,
            options=dict(state.options) if state else {},
            watching=list(_import_hooks.watched()),
            note=_last_skip if state is None else "",
            adapters=rows,
        )


# --------------------------------------------------------------------------- install


def _install(source: str, adapters: Iterable[str] | None, disabled_adapters: Iterable[str] | None,
             strict: bool | None, rebind_aliases: bool | None,
             policy_kw: dict[str, Any]) -> InstallReport:
    global _state, _generation, _last_skip
    from metal_guard import policy
    from metal_guard.options import settings_overrides, validate_options
    from metal_guard.settings import get_settings

    guard_options = validate_options(policy_kw, where="install()", per_call=False, stacklevel=4)
    for key, flag in (("strict", strict), ("rebind_aliases", rebind_aliases)):
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"install(): {key} must be True or False, not {flag!r}")
    own: dict[str, Any] = {}
    for key, value in (("adapters", normalise_names(adapters)),
                       ("disabled_adapters", normalise_names(disabled_adapters)),
                       ("strict", strict), ("rebind_aliases", rebind_aliases)):
        if value is not None:
            own[key] = value
    options = {**guard_options, **own}
    settings = get_settings(**settings_overrides(guard_options), **own)
    if settings.disabled:
        _last_skip = "kill switch METALGUARD_DISABLED=1: nothing installed"
        log.info("metal-guard: %s", _last_skip)
        return adapter_report()
    enabled, disabled = select_adapters(settings, explicit=adapters is not None or disabled_adapters is not None)
    with _lock:
        if _state is not None:
            if options and options != _state.options:
                warnings.warn("metal_guard.install(): already installed with other options; "
                              "call metal_guard.uninstall() first to change them", RuntimeWarning,
                              stacklevel=3)
            return adapter_report()
        _generation += 1
        gen = _generation
        states = {n: _AdapterState(REGISTRY[n]) for n in enabled}
        for n in disabled:
            states[n] = _AdapterState(REGISTRY[n], DISABLED, "disabled by configuration")
        _state = _State(gen, options, settings, source, states)
        policy.ACTIVATION.generation = gen
        policy.configure(guard_options)
        _register_fork_handlers()
        hooks = [(trigger, functools.partial(_on_import, name, gen))
                 for name in enabled for trigger in REGISTRY[name].triggers]
        _state.hooks = hooks
    try:
        for trigger, hook in hooks:
            if not _current(gen):
                break
            _import_hooks.register(trigger, hook)  # runs the hook now if already imported
    except BaseException:
        uninstall()
        raise
    if not _current(gen):  # uninstalled concurrently: take our hooks back
        for trigger, hook in hooks:
            _import_hooks.unregister(trigger, hook)
    log.info("metal-guard installed (%s): adapters %s", source, ", ".join(enabled) or "none")
    return adapter_report()


def _current(gen: int) -> bool:
    return _state is not None and _state.generation == gen


def autoload_install() -> InstallReport:
    """Entry point of the zero-code boot module (``METALGUARD_AUTOLOAD=1``)."""
    return _install("autoload", None, None, None, None, {})


# --------------------------------------------------------------------------- hooks


def _on_import(name: str, gen: int, module: ModuleType) -> None:
    """Post-import hook: wrap this module's targets of adapter ``name`` (generation ``gen``)."""
    if not _current(gen):
        return
    info = REGISTRY[name]
    try:
        adapter = importlib.import_module(info.module)  # outside the lock (it imports wrapt)
    except Exception as exc:
        _fail(name, gen, f"adapter module {info.module} could not be imported: {type(exc).__name__}: {exc}", exc)
        return
    from metal_guard.adapters.base import wrap_site

    requires = [str(r) for r in (getattr(adapter, "INSTRUMENTS", ()) or ())]
    with _lock:
        first_check = _current(gen) and _state is not None and _state.adapters[name].versions is None
    untested: list[str] = []
    versions: dict[str, str | None] = {}
    if first_check:  # once per adapter and install (metadata reads are file I/O: outside the lock)
        versions, untested = check_requirements(requires)
    with _lock:
        if not _current(gen):
            return
        assert _state is not None
        ad = _state.adapters[name]
        if first_check and ad.versions is None:
            ad.requires, ad.versions, ad.untested = requires, versions, untested
        else:
            untested = []  # another hook of this adapter reported them already
        strict = bool(_state.settings.strict)
        rebind = bool(_state.settings.rebind_aliases)
        defined_as = _import_hooks.module_name(module)  # "mlx_lm.server" also when run as __main__
        ad.modules.add(defined_as if defined_as == module.__name__ else f"{defined_as} (as __main__)")
        fresh: dict[int, tuple[Any, Any]] = {}
        missing: list[str] = []
        for target in getattr(adapter, "TARGETS", ()):
            if target.module != defined_as:
                continue
            try:
                guard, created = wrap_site(module, target, generation=gen)
            except Exception as exc:  # PathResolutionError: the target moved
                if target.required:
                    missing.append(f"{target.site} ({type(exc).__name__})")
                log.debug("cannot wrap %s: %s", target.site, exc)
                continue
            ad.sites[target.site] = _Site(module, target.path, guard)
            if created:
                fresh[id(guard.__wrapped__)] = (guard.__wrapped__, guard)
        if fresh:
            ad.aliases.extend(sweep(fresh, info.packages))
            if rebind:
                ad.aliases.extend(sweep(fresh, None))
        ad.missing.extend(m for m in missing if m not in ad.missing)
        if ad.missing or ad.untested:
            ad.state, ad.reason = DEGRADED, ad.degraded_reason()
        elif ad.state != FAILED:
            ad.state, ad.reason = PATCHED, ""
    problems = [*untested]
    if missing:
        problems.append(f"{', '.join(missing)} not found (library changed?)")
    if problems:
        message = f"metal-guard adapter {name!r} degraded: {'; '.join(problems)}"
        if untested and not missing:
            message += " - guarding it anyway, as far as its targets exist"
        if strict:
            uninstall()
            raise AdapterError(message)
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    _call_adapter_hook(info, "on_patched", module)
    _announce(name, gen)


def _announce(name: str, gen: int) -> None:
    global _announced
    with _lock:
        if _announced or not _current(gen):
            return
        assert _state is not None
        if not _state.settings.announce or _state.adapters[name].state not in (PATCHED, DEGRADED):
            return
        _announced = True
    try:
        sys.stderr.write(announce_line(name, adapter_report()) + "\n")
        sys.stderr.flush()
    except Exception:  # a closed stderr must not break the import being hooked
        pass


def _fail(name: str, gen: int, reason: str, exc: BaseException) -> None:
    with _lock:
        if not _current(gen):
            return
        assert _state is not None
        ad = _state.adapters[name]
        ad.state, ad.reason = FAILED, reason
        strict = bool(_state.settings.strict)
    if strict:
        uninstall()
        raise AdapterError(f"metal-guard adapter {name!r} failed: {reason}") from exc
    log.warning("metal-guard adapter %r failed: %s", name, reason)
    warnings.warn(f"metal-guard adapter {name!r} failed: {reason}", RuntimeWarning, stacklevel=2)


def _call_adapter_hook(info: AdapterInfo, hook: str, *args: Any) -> None:
    module = sys.modules.get(info.module)
    fn = getattr(module, hook, None) if module is not None else None
    if fn is None:
        return
    try:
        fn(*args)
    except Exception as exc:
        log.warning("adapter %s %s failed: %s", info.name, hook, exc)
