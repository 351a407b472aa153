"""Composable guards: ``@guarded_generate``, ``isolated_model(...)``, ``bench_scoped_load(...)``.

``@guarded_generate`` applies the ``generate`` policy (OOM protection, inference counting, the
periodic flush, the prefill guard, the memory heartbeat) to your own function::

    @guarded_generate
    def answer(model, tokenizer, question): ...

    @guarded_generate(flush_every_n=10, model_id="qwen3-4b")
    def stream_answer(model, tokenizer, question):
        yield from mlx_lm.stream_generate(model, tokenizer, question)

The wrapper is chosen from the decorated function: a plain function, a generator function
(guarded per resumption — nothing is held across a ``yield``; ``send``, ``throw``, ``close`` and
the return value pass through, and it may be stepped from different threads), a coroutine
function or an async generator function. Methods work too.

Guards stack through context, never by patching per block: the keyword policy of the decorator
is put into the policy context (:func:`metal_guard.policy.scope`) for the duration of each call,
so the adapters installed by :func:`metal_guard.install` see it, and only the outermost guarded
call of a kind applies the policy (a guarded function calling ``mlx_lm.generate`` is guarded
once; a model load inside it is still checked by the load policy).

``isolated_model`` (subprocess isolation) and ``bench_scoped_load`` (one model at a time) are
re-exported from their own modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, overload

from metal_guard.bench import bench_scoped_load

if TYPE_CHECKING:  # pragma: no cover
    from metal_guard.isolation.context import isolated_model

__all__ = ["bench_scoped_load", "guard_policy", "guarded_generate", "isolated_model", "suppressed"]

F = TypeVar("F", bound=Callable[..., Any])


def _describe_any(site: str) -> Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]:
    """Find a model loaded through a guarded load among the first arguments (for its id)."""
    from metal_guard.policy import CallInfo, model_id_of

    def describe(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        candidates = [kwargs.get("model"), *args[:3]]
        for obj in candidates:
            model_id = model_id_of(obj)
            if model_id is not None:
                return CallInfo(site, model=obj, model_id=model_id)
        return CallInfo(site)

    return describe


@overload
def guarded_generate(fn: F, /) -> F: ...


@overload
def guarded_generate(fn: None = None, /, **policy: Any) -> Callable[[F], F]: ...


def guarded_generate(fn: Any = None, /, **policy: Any) -> Any:
    """Decorate a function that runs MLX generation (see the module docstring).

    ``policy``: the guard options of :mod:`metal_guard.options` (``model_id``, ``mode``,
    ``flush_every_n``, ``prefill_guard``, ``oom_retries``, ``cadence``, ``fit_check``, ...),
    the same keys as ``install()`` and ``guard_policy()``. They are checked when the
    decorator is applied: an unknown key or a wrong type is a ``TypeError``, a value out of
    range a ``SettingsError`` (a ``ValueError``).
    """
    from metal_guard.policy import validate_policy

    overrides = validate_policy(policy, where="guarded_generate()", stacklevel=4)
    if fn is not None and not callable(fn):
        raise TypeError(f"guarded_generate() expects a function, got {type(fn).__name__}")

    def decorate(func: F) -> F:
        from metal_guard.adapters.base import guard_wrapper, kind_of, make_guard

        site = f"{getattr(func, '__module__', '?')}:{getattr(func, '__qualname__', repr(func))}"
        wrapper = guard_wrapper("generate", kind_of(func), site=site, describe=_describe_any(site),
                                generation=None, overrides=overrides or None)
        return make_guard(func, wrapper, site=site, generation=None)  # type: ignore[return-value]

    return decorate(fn) if fn is not None else decorate


def guard_policy(**policy: Any) -> Any:
    """Context manager: apply ``policy`` to every guarded call inside the block (adapters and
    decorators alike). The same option keys as :func:`guarded_generate` and ``install()``,
    checked at once (before the block runs); context-local."""
    from metal_guard.policy import scope

    return scope(**policy)


@contextlib.contextmanager
def suppressed() -> Iterator[None]:
    """Inside the block every guard (installed adapters and decorators) lets calls straight
    through — for code that must not be guarded, e.g. a health probe. Context-local."""
    from metal_guard.policy import GENERATE_BIT, GUARDED, LOAD_BIT

    token = GUARDED.set(GUARDED.get() | LOAD_BIT | GENERATE_BIT)  # every family looks "nested"
    try:
        yield
    finally:
        GUARDED.reset(token)


def __getattr__(name: str) -> Any:
    # ``isolated_model`` is resolved on first use: the isolation layer is heavier to import.
    if name == "isolated_model":
        from metal_guard.isolation.context import isolated_model

        globals()[name] = isolated_model
        return isolated_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
