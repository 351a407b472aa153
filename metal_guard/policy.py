"""The guard policy that adapters and decorators apply, carried in ContextVars.

Installed wrappers and ``@guarded_generate`` never patch anything per block: they read the
context set here.

* :data:`GUARDED` — which policy families (load, generate) are being applied in this context;
  only the outermost call of a family applies it, so ``generate`` → ``stream_generate`` (or
  ``ChatMLX`` → ``mlx_lm.generate``) is guarded once, while a load inside a guarded generate
  function is still checked.
* :func:`scope` — per-call policy overrides (``guarded_generate(**policy)``, ``isolated_model``):
  keys from :data:`POLICY_KEYS`, e.g. ``model_id``, ``cadence=False``, ``flush_every_n=10``.

Three policies (see ``docs/integration.md`` for the exact steps):

* ``load`` — panic gate (L10), circuit breaker (L9), known-panic registry, fit check (L4),
  cadence (L9), the cross-process lock (L8) if configured, breadcrumbs, peak-ledger record.
* ``generate`` — OOM protection (L3), ResourceTracker counting (L14), a cache flush every N
  calls (agent loops), the gemma-4 first-generation flush (C7), the prefill guard (R4) and the
  memory heartbeat for the status snapshot (L13). Generators get it per resumption.
* ``step`` — one step of a batch (``BatchGenerator.next``): OOM protection and the heartbeat.

Observer mode runs every check, records what it would have refused (an ``OBSERVE``
breadcrumb and a warning) and lets the call through. A safety layer that cannot be imported is
a ``GuardLayerError`` (defensive) or a warning on every call (observer); a check that fails
unexpectedly while running is skipped with a warning (see :mod:`metal_guard._policy_steps`).

Options (``install()``'s, then ``guard_policy()`` / ``@guarded_generate(...)`` scopes) come from
one vocabulary, :mod:`metal_guard.options`.

Settings: a load resolves :func:`~metal_guard.settings.get_settings` afresh (kwargs of
``install()`` > scope > env > defaults). The per-token hot path uses a snapshot refreshed by
``install()``, ``uninstall()``, every guarded load and :func:`refresh_settings` — call the
latter after changing ``METALGUARD_*`` variables in-process.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from metal_guard.options import option_names, settings_overrides, validate_options
from metal_guard.settings import Settings, get_settings

log = logging.getLogger("metal_guard.policy")

__all__ = [
    "ACTIVATION", "GUARDED", "OVERRIDES", "POLICIES", "POLICY_KEYS", "CallInfo", "GuardPolicy",
    "current_policy", "get_policy", "in_guarded_call", "model_id_of", "refresh_settings",
    "remember_model", "scope",
]

#: Bit mask of the policy families applied by an enclosing guarded call.
GUARDED: ContextVar[int] = ContextVar("metal_guard_guarded", default=0)
LOAD_BIT, GENERATE_BIT = 1, 2
_EMPTY: Mapping[str, Any] = {}
OVERRIDES: ContextVar[Mapping[str, Any]] = ContextVar("metal_guard_policy", default=_EMPTY)
_OVERRIDES = OVERRIDES

#: The guard option keys (:mod:`metal_guard.options`): the same for ``install()``,
#: ``@guarded_generate(...)`` and ``guard_policy(...)``.
POLICY_KEYS = option_names()


@dataclass
class CallInfo:
    """What a guarded call is about; built by the target's ``describe`` (outermost calls only)."""

    site: str
    model: Any = None
    model_id: str | None = None
    prompt_tokens: int | None = None
    count: int = 1
    local_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _Activation:
    """The current ``install()`` generation; 0 = not installed, and then the wrappers made by
    ``install()`` pass calls straight through."""

    __slots__ = ("generation",)

    def __init__(self) -> None:
        self.generation = 0


ACTIVATION = _Activation()


# --------------------------------------------------------------------------- context


def validate_policy(policy: Mapping[str, Any], *, where: str = "guard policy",
                    stacklevel: int = 4) -> dict[str, Any]:
    """``policy`` checked against the option vocabulary (:func:`metal_guard.options.validate_options`)."""
    return validate_options(policy, where=where, stacklevel=stacklevel)


@contextlib.contextmanager
def scope(**policy: Any) -> Iterator[Mapping[str, Any]]:
    """Apply ``policy`` to the guarded calls made inside the block (nested scopes merge, inner
    keys win). Context-local: other threads and tasks are not affected."""
    merged = {**_OVERRIDES.get(), **validate_policy(policy, where="guard_policy()", stacklevel=5)}
    token = _OVERRIDES.set(merged)
    try:
        yield merged
    finally:
        _OVERRIDES.reset(token)


def _effective() -> Mapping[str, Any]:
    """The options in force here: ``install()``'s, then the enclosing scopes' (inner wins)."""
    scoped = _OVERRIDES.get()
    if not _install_options:
        return scoped
    if not scoped:
        return _install_options
    return {**_install_options, **scoped}


def current_policy() -> Mapping[str, Any]:
    """The guard options in effect here: ``install()``'s options overlaid by the enclosing
    ``guard_policy()`` / ``@guarded_generate(...)`` scopes (empty when there are none)."""
    return _effective()


def in_guarded_call() -> bool:
    """True inside a guarded call (some policy is already being applied)."""
    return GUARDED.get() != 0


# --------------------------------------------------------------------------- settings

_install_options: dict[str, Any] = {}  # install()'s guard options (validated)
_install_overrides: dict[str, Any] = {}  # ... as Settings fields
_hot: Settings | None = None
_hot_disabled = False


def configure(options: Mapping[str, Any] | None) -> Settings:
    """Called by ``install()`` (its validated guard options) and ``uninstall()`` (``None``)."""
    global _install_overrides, _install_options
    _install_options = dict(options or {})
    _install_overrides = settings_overrides(_install_options)
    return refresh_settings()


def refresh_settings() -> Settings:
    """Re-read the environment for the generation hot path; returns the new snapshot."""
    global _hot, _hot_disabled
    settings = get_settings(**_install_overrides)
    _hot, _hot_disabled = settings, settings.disabled
    return settings


def hot_settings() -> Settings:
    return _hot if _hot is not None else refresh_settings()


def guards_inactive() -> bool:
    """The kill switch (``METALGUARD_DISABLED=1``) as of the last refresh."""
    if _hot is None:
        refresh_settings()
    return _hot_disabled


def settings_for_call() -> Settings:
    """Fresh settings for a load: install kwargs, then scope keys, over env and defaults."""
    overrides = dict(_install_overrides)
    overrides.update(settings_overrides(_OVERRIDES.get()))
    return get_settings(**overrides)


# --------------------------------------------------------------------------- model ids

_MODEL_IDS: dict[int, str] = {}


def remember_model(model: Any, model_id: str) -> None:
    """Tag a loaded model object with its id (forgotten when the model is collected)."""
    import weakref

    key = id(model)
    try:
        weakref.finalize(model, _MODEL_IDS.pop, key, None)
    except TypeError:  # not weak-referenceable: keep no tag rather than a stale one
        return
    _MODEL_IDS[key] = model_id


def model_id_of(model: Any) -> str | None:
    return _MODEL_IDS.get(id(model)) if model is not None else None


# --------------------------------------------------------------------------- fork safety

#: Platforms where a child forked after Metal was initialised must not run MLX.
FORK_POISON_PLATFORMS: tuple[str, ...] = ("darwin",)
_metal_touched = False
_fork_poisoned = False


def mark_metal_touched() -> None:
    global _metal_touched
    _metal_touched = True


def after_fork_in_child() -> None:
    """Registered once by ``install()`` via ``os.register_at_fork``."""
    global _fork_poisoned, _publish_lock
    _publish_lock = threading.Lock()
    if _metal_touched and sys.platform in FORK_POISON_PLATFORMS:
        _fork_poisoned = True


def _check_fork() -> None:
    if _fork_poisoned:
        from metal_guard.errors import MetalGuardError

        raise MetalGuardError(
            "this process was fork()ed after its parent initialised Metal; MLX work in it crashes "
            "or hangs on macOS. Start workers with multiprocessing.set_start_method('spawn') or "
            "use metal_guard.isolated_model().")


# --------------------------------------------------------------------------- policies


class GuardPolicy:
    """Base policy: ``begin`` before the call (or first resumption), ``translate`` an error,
    ``end`` after it. ``run``/``run_async`` apply them to a plain call."""

    name = "base"
    bit = GENERATE_BIT

    def begin(self, info: CallInfo) -> None:
        _check_fork()

    def translate(self, exc: BaseException, info: CallInfo) -> BaseException:
        return _translate_oom(exc, info)

    def end(self, info: CallInfo, failed: bool) -> None:
        _publish(info, force=bool(info.extra.get("first_generation")) and not failed)

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], info: CallInfo) -> Any:
        self.begin(info)
        failed = True
        try:
            result = fn(*args, **kwargs)
            failed = False
            return result
        except Exception as exc:
            new = self.translate(exc, info)
            if new is exc:
                raise
            raise new from exc
        finally:
            self.end(info, failed)

    async def run_async(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], info: CallInfo) -> Any:
        self.begin(info)
        failed = True
        try:
            result = await fn(*args, **kwargs)
            failed = False
            return result
        except Exception as exc:
            new = self.translate(exc, info)
            if new is exc:
                raise
            raise new from exc
        finally:
            self.end(info, failed)


class StepPolicy(GuardPolicy):
    name = "step"

    def begin(self, info: CallInfo) -> None:
        _check_fork()
        mark_metal_touched()


class GeneratePolicy(GuardPolicy):
    name = "generate"

    def begin(self, info: CallInfo) -> None:
        steps = _steps()
        _check_fork()
        mark_metal_touched()
        pol = _effective()
        hot = hot_settings()
        if info.model_id is None:
            info.model_id = model_id_of(info.model) or pol.get("model_id")
        number = next(_CALLS)
        steps.count_inferences(info.count)
        every = pol.get("flush_every_n", hot.flush_every_n)
        if every and number % int(every) == 0:
            steps.periodic_flush(number)
        if info.model_id:
            steps.first_generation_flush(info, pol, hot)
        if info.prompt_tokens and pol.get("prefill_guard", True):
            steps.prefill_guard(info, hot.replace(mode=pol["mode"]) if "mode" in pol else hot)

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], info: CallInfo) -> Any:
        retries = int(_effective().get("oom_retries", 0) or 0)
        if retries <= 0:
            return super().run(fn, args, kwargs, info)
        from metal_guard import _policy_steps as steps
        from metal_guard.oom import call_with_oom_recovery

        self.begin(info)
        failed = True
        try:
            result = call_with_oom_recovery(fn, args, kwargs, max_retries=retries,
                                            cleanup=steps.light_cleanup, settings=hot_settings())
            failed = False
            return result
        finally:
            self.end(info, failed)


class LoadPolicy(GuardPolicy):
    name = "load"
    bit = LOAD_BIT

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], info: CallInfo) -> Any:
        from metal_guard import _policy_steps as steps

        _check_fork()
        settings = settings_for_call()
        pol = _effective()
        model_id = str(info.model_id or pol.get("model_id") or "unknown-model")
        info.model_id = model_id
        steps.before_load(model_id, info, pol, settings)
        with steps.load_lock(model_id, settings):
            started = time.monotonic()
            steps.start_load(model_id, info)
            mark_metal_touched()
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                new = self.translate(exc, info)
                steps.load_failed(model_id, info, new)
                if new is exc:
                    raise
                raise new from exc
        model = result[0] if isinstance(result, tuple) and result else None
        if model is not None:
            remember_model(model, model_id)
            steps.forget_model(model)
        steps.load_done(model_id, info, time.monotonic() - started)
        refresh_settings()
        _publish(info, force=True)
        return result


_CALLS = itertools.count(1)
_STEPS: Any = None


def _steps() -> Any:
    """:mod:`metal_guard._policy_steps`, imported on first use."""
    global _STEPS
    if _STEPS is None:
        from metal_guard import _policy_steps

        _STEPS = _policy_steps
    return _STEPS

POLICIES: dict[str, GuardPolicy] = {
    "load": LoadPolicy(),
    "generate": GeneratePolicy(),
    "step": StepPolicy(),
}


def get_policy(name: str) -> GuardPolicy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown guard policy {name!r} (known: {', '.join(POLICIES)})") from None


# --------------------------------------------------------------------------- shared steps


def _translate_oom(exc: BaseException, info: CallInfo) -> BaseException:
    """A Metal OOM becomes :class:`MetalOOMError` after a cache flush; anything else as is."""
    from metal_guard.errors import MetalOOMError

    if isinstance(exc, MetalOOMError) or not isinstance(exc, Exception):
        return exc
    try:
        from metal_guard import _policy_steps as steps

        return steps.translate_oom(exc, info, hot_settings())
    except Exception as inner:  # never mask the user's error with ours
        log.debug("OOM translation failed: %s", inner)
        return exc


PUBLISH_INTERVAL_SEC = 1.0
_publish_lock = threading.Lock()
_last_publish = 0.0


def _publish(info: CallInfo, *, force: bool = False) -> None:
    """Publish this process's memory for the status snapshot (at most once a second)."""
    global _last_publish
    now = time.monotonic()
    if not force and now - _last_publish < PUBLISH_INTERVAL_SEC:
        return
    with _publish_lock:
        if not force and now - _last_publish < PUBLISH_INTERVAL_SEC:
            return
        _last_publish = now
    _steps().publish_memory(info)
