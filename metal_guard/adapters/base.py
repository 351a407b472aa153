"""The shared shape of every adapter: one marker wrapper class, targets, wrap/unwrap, drivers.

An adapter module (``metal_guard/adapters/<name>.py``) declares what to guard as data::

    TARGETS = (
        Target("mlx_lm.utils", "load", "load", describe=describe_load),
        Target("mlx_lm.generate", "stream_generate", "generate", describe=describe_generate),
        Target("mlx_lm.generate", "BatchGenerator.next", "step"),
    )

``module`` is the module that *defines* the object (never a re-export), ``path`` a dotted path
inside it (``"Class.method"`` works), ``policy`` one of :data:`metal_guard.policy.POLICIES`
(``"load"``, ``"generate"``, ``"step"``) and ``describe(instance, args, kwargs) -> CallInfo``
tells the policy what the call is about (model id, prompt length). A target may instead bring its
own wrapt wrapper function (``wrapper=``); it is then marked and gated like every other.
Optional hooks: ``on_patched(module)`` after a module's targets were wrapped and
``on_unpatched()`` after uninstall. :func:`metal_guard.install` imports the adapter module only
when one of its target modules is imported.

Every wrapper is a :class:`GuardWrapper` — a ``wrapt.FunctionWrapper`` subclass defined here —
so metal-guard recognises its own wrappers anywhere in a chain (:func:`find_guard`) and never
mistakes another tool's wrapt wrapper for one of ours. Sites are resolved with
``wrapt.resolve_path`` (``vars()`` along the MRO), never ``getattr`` on a class, which would
return a fresh ``BoundFunctionWrapper`` whose chain does not contain the wrapper.

The wrapper chosen for a site depends on the wrapped object: a plain call, a generator (guarded
per resumption — nothing is held across a ``yield``; ``send``/``throw``/``close`` and the return
value pass through), a coroutine function or an async generator. Only the outermost guarded
call of a policy family applies it (a ContextVar bit mask), so ``generate`` → ``stream_generate`` is guarded once.

Thread hygiene: every guarded call (each resumption, for generators) on a thread other than the
main one registers, once per thread, the clearing of that thread's MLX streams at its exit
(:func:`metal_guard.threads.clear_streams_at_thread_exit`), so a LangChain executor, a user pool
or ``asyncio.to_thread`` never aborts the process at exit.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

import wrapt

from metal_guard import policy as _policy
from metal_guard.policy import GUARDED, OVERRIDES, CallInfo, GuardPolicy
from metal_guard.threads import clear_streams_at_thread_exit as _thread_hygiene

log = logging.getLogger("metal_guard.adapters")

__all__ = [
    "GuardWrapper",
    "Target",
    "count_guards",
    "find_guard",
    "guard_wrapper",
    "is_guard",
    "kind_of",
    "unwrap_site",
    "wrap_site",
]

Describe = Callable[[Any, tuple[Any, ...], dict[str, Any]], CallInfo]


class GuardWrapper(wrapt.FunctionWrapper):  # type: ignore[misc]
    """metal-guard's marker wrapper. ``_self_site`` names the site it was made for and
    ``_self_generation`` the ``install()`` generation it belongs to (``None`` for decorators)."""


@dataclass(frozen=True)
class Target:
    """One object an adapter guards (see the module docstring)."""

    module: str
    path: str
    policy: str = "generate"
    describe: Describe | None = None
    wrapper: Callable[..., Any] | None = None
    required: bool = True

    @property
    def site(self) -> str:
        return f"{self.module}:{self.path}"


def is_guard(obj: Any) -> bool:
    """True for a metal-guard wrapper itself (``type()``, not the proxied ``__class__``)."""
    return issubclass(type(obj), GuardWrapper)


def find_guard(obj: Any) -> GuardWrapper | None:
    """Our wrapper anywhere in ``obj``'s wrapper chain, else ``None``."""
    return wrapt.find_wrapper(obj, predicate=is_guard)  # type: ignore[no-any-return]


def count_guards(obj: Any) -> int:
    """How many metal-guard wrappers sit in ``obj``'s chain (tests expect 0 or 1)."""
    return sum(1 for entry in wrapt.wrapper_chain(obj) if is_guard(entry))


def kind_of(fn: Any) -> str:
    """``"agen"``, ``"async"``, ``"gen"`` or ``"call"`` for the object being wrapped."""
    if inspect.isasyncgenfunction(fn):
        return "agen"
    if inspect.iscoroutinefunction(fn):
        return "async"
    if inspect.isgeneratorfunction(fn):
        return "gen"
    return "call"


def _default_describe(site: str) -> Describe:
    def describe(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallInfo:
        return CallInfo(site)

    return describe


# --------------------------------------------------------------------------- drivers
#
# ``GUARDED`` is a bit mask of the policy families being applied in this context (load,
# generate). A call whose family bit is already set is nested: it runs without the policy.
# ``overrides`` (from ``@guarded_generate(**policy)``) are put in the policy context around the
# call — for a generator around each resumption only, never while the consumer runs.


def _enter(overrides: Mapping[str, Any] | None) -> Any:
    if not overrides:
        return None
    return OVERRIDES.set({**OVERRIDES.get(), **overrides})


def _drive(gen: Generator[Any, Any, Any], pol: GuardPolicy, info: Callable[[], CallInfo],
           overrides: Mapping[str, Any] | None = None) -> Generator[Any, Any, Any]:
    """Re-yield ``gen``'s items, applying ``pol`` to each resumption (outermost only)."""
    bit = pol.bit
    call: CallInfo | None = None
    begun = False
    failed = True
    throw: BaseException | None = None
    value: Any = None
    try:
        while True:
            _thread_hygiene()  # a generator may be resumed on another thread each time
            otoken = _enter(overrides)
            mask = GUARDED.get()
            token = None if mask & bit else GUARDED.set(mask | bit)
            try:
                if token is not None and not begun:
                    call = call or info()
                    pol.begin(call)
                    begun = True
                item = gen.throw(throw) if throw is not None else gen.send(value)
            except StopIteration as stop:
                failed = False
                return stop.value
            except Exception as exc:
                if token is None or call is None:
                    raise
                new = pol.translate(exc, call)
                if new is exc:
                    raise
                raise new from exc
            finally:
                if token is not None:
                    GUARDED.reset(token)
                if otoken is not None:
                    OVERRIDES.reset(otoken)
            throw = value = None
            try:
                value = yield item
            except GeneratorExit:
                gen.close()
                failed = False
                raise
            except BaseException as exc:  # forwarded into the wrapped generator: gen.throw()
                throw = exc
    finally:
        if begun and call is not None:
            pol.end(call, failed)


async def _adrive(agen: AsyncGenerator[Any, Any], pol: GuardPolicy, info: Callable[[], CallInfo],
                  overrides: Mapping[str, Any] | None = None) -> AsyncGenerator[Any, Any]:
    """The async-generator twin of :func:`_drive` (``asend``/``athrow``/``aclose``)."""
    bit = pol.bit
    call: CallInfo | None = None
    begun = False
    failed = True
    throw: BaseException | None = None
    value: Any = None
    try:
        while True:
            _thread_hygiene()
            otoken = _enter(overrides)
            mask = GUARDED.get()
            token = None if mask & bit else GUARDED.set(mask | bit)
            try:
                if token is not None and not begun:
                    call = call or info()
                    pol.begin(call)
                    begun = True
                item = await (agen.athrow(throw) if throw is not None else agen.asend(value))
            except StopAsyncIteration:
                failed = False
                return
            except Exception as exc:
                if token is None or call is None:
                    raise
                new = pol.translate(exc, call)
                if new is exc:
                    raise
                raise new from exc
            finally:
                if token is not None:
                    GUARDED.reset(token)
                if otoken is not None:
                    OVERRIDES.reset(otoken)
            throw = value = None
            try:
                value = yield item
            except GeneratorExit:
                await agen.aclose()
                failed = False
                raise
            except BaseException as exc:
                throw = exc
    finally:
        if begun and call is not None:
            pol.end(call, failed)


def guard_wrapper(
    pol: GuardPolicy | str,
    kind: str,
    *,
    site: str,
    describe: Describe | None = None,
    generation: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Callable[[Any, Any, tuple[Any, ...], dict[str, Any]], Any]:
    """Build the wrapt wrapper function for one site.

    ``generation`` marks a wrapper made by ``install()``: such wrappers pass calls straight
    through while metal-guard is not installed (copies that could not be removed, or that a user
    module kept), and work again after a new ``install()``. ``None`` (decorators): always on.
    """
    policy_obj = _policy.get_policy(pol) if isinstance(pol, str) else pol
    desc = describe or _default_describe(site)
    bit = policy_obj.bit
    activation = _policy.ACTIVATION
    inactive = _policy.guards_inactive
    installed = generation is not None

    if kind in ("gen", "agen"):
        driver = _drive if kind == "gen" else _adrive

        def gen_wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if (installed and not activation.generation) or inactive():
                return wrapped(*args, **kwargs)
            return driver(wrapped(*args, **kwargs), policy_obj,
                          lambda: desc(instance, args, kwargs), overrides)

        return gen_wrapper

    if kind == "async":

        async def async_wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if (installed and not activation.generation) or inactive():
                return await wrapped(*args, **kwargs)
            _thread_hygiene()
            otoken = _enter(overrides)
            mask = GUARDED.get()
            try:
                if mask & bit:
                    return await wrapped(*args, **kwargs)
                token = GUARDED.set(mask | bit)
                try:
                    return await policy_obj.run_async(wrapped, args, kwargs, desc(instance, args, kwargs))
                finally:
                    GUARDED.reset(token)
            finally:
                if otoken is not None:
                    OVERRIDES.reset(otoken)

        return async_wrapper

    def call_wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if (installed and not activation.generation) or inactive():
            return wrapped(*args, **kwargs)
        _thread_hygiene()
        otoken = _enter(overrides)
        mask = GUARDED.get()
        try:
            if mask & bit:
                return wrapped(*args, **kwargs)
            token = GUARDED.set(mask | bit)
            try:
                return policy_obj.run(wrapped, args, kwargs, desc(instance, args, kwargs))
            finally:
                GUARDED.reset(token)
        finally:
            if otoken is not None:
                OVERRIDES.reset(otoken)

    return call_wrapper


def make_guard(original: Any, wrapper: Callable[..., Any], *, site: str, generation: int | None) -> GuardWrapper:
    """Wrap ``original`` in a :class:`GuardWrapper` carrying its site and generation."""
    guard = GuardWrapper(original, wrapper)
    guard._self_site = site  # type: ignore[attr-defined]
    guard._self_generation = generation  # type: ignore[attr-defined]
    return guard


# --------------------------------------------------------------------------- sites


def wrap_site(owner: Any, target: Target, *, generation: int) -> tuple[GuardWrapper, bool]:
    """Wrap ``target`` on ``owner`` (its defining module object) unless ours is already there.

    Returns ``(wrapper, created)``. Raises ``wrapt``'s ``PathResolutionError`` (an
    ``AttributeError``) when the target moved.
    """
    _parent, _attr, current = wrapt.resolve_path(owner, target.path)
    existing = find_guard(current)
    if existing is not None:
        return existing, False
    if target.wrapper is not None:
        fn = _gated(target.wrapper, generation)
    else:
        fn = guard_wrapper(target.policy, kind_of(current), site=target.site,
                           describe=target.describe, generation=generation)

    def factory(original: Any) -> GuardWrapper:
        return make_guard(original, fn, site=target.site, generation=generation)

    guard: GuardWrapper = wrapt.wrap_object(owner, target.path, factory)  # type: ignore[arg-type]
    return guard, True


def _gated(wrapper: Callable[..., Any], generation: int) -> Callable[..., Any]:
    activation = _policy.ACTIVATION

    def gated(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not activation.generation or _policy.guards_inactive():
            return wrapped(*args, **kwargs)
        _thread_hygiene()
        return wrapper(wrapped, instance, args, kwargs)

    return gated


def unwrap_site(owner: Any, path: str, handle: GuardWrapper) -> bool:
    """Splice ``handle`` out of the site; ``False`` if it cannot be (a non-wrapt wrapper sits on
    top — the wrapper then stays in place but inert) or is already gone."""
    try:
        removed = wrapt.unwrap_object(owner, path, handle, missing_ok=True)
    except wrapt.WrapperNotOutermostError as exc:
        log.warning("cannot remove the metal-guard wrapper of %s: %s; it stays in place, inert",
                    getattr(handle, "_self_site", path), exc)
        return False
    except AttributeError as exc:  # the path itself is gone (module reloaded differently...)
        log.debug("unwrap %s: %s", path, exc)
        return False
    return removed is not None
