"""Upstream defensive patches: small, reversible fixes for known bugs in the MLX stack.

:func:`install_upstream_defensive_patches` walks :data:`PATCHES`. For each patch it

1. checks that the target package is installed (else ``unavailable``);
2. applies the version gate: the advisory in ``advisories.json`` that names the patch must
   match the installed versions (else ``not-needed``; ``force=True`` skips this step);
3. imports the target and *feature-detects* the bug on the installed code (else
   ``not-needed``), so a gate that is too wide never patches fixed code;
4. replaces the broken attributes, keeping the originals (``applied``; ``failed`` if anything
   raised, with nothing left half-patched).

Installing twice is a no-op. Replacements are plain attribute assignments marked with
``__metal_guard_patch__``; when another library (e.g. a metal-guard adapter) has already wrapped
the attribute with a wrapt proxy, the patch is spliced in *under* that wrapper so the wrapper
keeps working. :func:`uninstall_upstream_defensive_patches` puts the originals back the same
way. Nothing here runs at import time; wrapt is imported only while (un)installing.

Patches:

* ``mlx_lm_1128_think_start_id`` — mlx-lm 0.31.2: ``TokenizerWrapper.think_start_id`` /
  ``think_end_id`` raise ``TypeError`` for tokenizers without thinking tokens (mlx-lm#1128).
* ``langchain_mlx_pipeline`` — langchain-community ``MLXPipeline._call`` / ``_stream`` against
  mlx-lm >= 0.32 (``formatter=`` TypeError; ``generate_step`` moved out of ``mlx_lm.utils``).
* ``langchain_chat_mlx`` — ``ChatMLX._stream`` (same ``generate_step`` import). ``ChatMLX``
  ``invoke`` goes through ``MLXPipeline._call`` and is fixed by the previous patch.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

log = logging.getLogger("metal_guard.knowledge.patches")

__all__ = [
    "APPLIED",
    "FAILED",
    "NOT_NEEDED",
    "PATCHES",
    "UNAVAILABLE",
    "PatchState",
    "defensive_patch_status",
    "install_upstream_defensive_patches",
    "uninstall_upstream_defensive_patches",
]

MARKER = "__metal_guard_patch__"


class PatchState(str):
    """A patch outcome: ``"applied"``, ``"not-needed"``, ``"unavailable"`` or ``"failed"``.

    It compares and serialises as the plain string and is truthy only when ``"applied"``
    (so seed-era ``if result["mlx_lm_1128_think_start_id"]:`` still means "patched").
    ``reason`` says why.
    """

    reason: str

    def __new__(cls, value: str, reason: str = "") -> PatchState:
        obj = super().__new__(cls, value)
        obj.reason = reason
        return obj

    def __bool__(self) -> bool:
        return str(self) == "applied"


APPLIED, NOT_NEEDED, UNAVAILABLE, FAILED = "applied", "not-needed", "unavailable", "failed"


class _Unavailable(Exception):
    pass


@dataclass
class _Replacement:
    owner: type
    attr: str
    original: Any
    new: Any


@dataclass(frozen=True)
class Patch:
    """One defensive patch. ``targets()`` imports and returns ``[(owner, attr)]``;
    ``broken(owner, attr, original)`` is the feature probe; ``build(...)`` the replacement."""

    name: str
    package: str
    gate: str  # the "patch" key of the advisory whose range gates this patch
    description: str
    targets: Callable[[], list[tuple[type, str]]]
    broken: Callable[[type, str, Any], bool]
    build: Callable[[type, str, Any], Any]
    requires: tuple[str, ...] = field(default=())
    modules: tuple[str, ...] = field(default=())  # where the targets live (for only_imported)


# --------------------------------------------------------------------------- mlx-lm#1128


def _tokenizer_targets() -> list[tuple[type, str]]:
    try:
        module = importlib.import_module("mlx_lm.tokenizer_utils")
    except ImportError as exc:
        raise _Unavailable(f"mlx_lm.tokenizer_utils cannot be imported: {exc}") from exc
    cls = getattr(module, "TokenizerWrapper", None)
    if cls is None:
        raise _Unavailable("mlx_lm.tokenizer_utils.TokenizerWrapper not found")
    return [(cls, a) for a in ("think_start_id", "think_end_id") if isinstance(cls.__dict__.get(a), property)]


def _token_field(attr: str) -> str:
    return "_" + attr.replace("_id", "_tokens")  # think_start_id -> _think_start_tokens


def _think_broken(owner: type, attr: str, original: Any) -> bool:
    probe: Any = object.__new__(owner)
    object.__setattr__(probe, _token_field(attr), None)
    try:
        return original.fget(probe) is not None  # a fixed property answers None
    except TypeError:
        return True  # len(None): the mlx-lm#1128 bug
    except Exception:
        return False  # a different implementation: leave it alone


def _think_build(owner: type, attr: str, original: Any) -> Any:
    token_field = _token_field(attr)

    def fget(self: Any) -> Any:
        if self.__dict__.get(token_field) is None:
            return None
        return original.fget(self)

    setattr(fget, MARKER, attr)
    return property(fget, original.fset, original.fdel, original.__doc__)


# --------------------------------------------------------------------------- langchain


def _import_quietly(name: str) -> types.ModuleType:
    with warnings.catch_warnings():  # langchain-community announces its sunset on import
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            raise _Unavailable(f"{name} cannot be imported: {exc}") from exc


def _pipeline_targets() -> list[tuple[type, str]]:
    cls = _import_quietly("langchain_community.llms.mlx_pipeline").MLXPipeline
    return [(cls, "_call"), (cls, "_stream")]


def _chat_targets() -> list[tuple[type, str]]:
    cls = _import_quietly("langchain_community.chat_models.mlx").ChatMLX
    return [(cls, "_stream")]


def _code_names(func: Any) -> set[str]:
    code = getattr(func, "__code__", None)
    if code is None:
        return set()
    names = set(code.co_names) | set(code.co_varnames)
    for const in code.co_consts:
        if isinstance(const, tuple):
            names |= {c for c in const if isinstance(c, str)}
    return names


def _langchain_broken(owner: type, attr: str, original: Any) -> bool:
    names = _code_names(original)
    generate = _import_quietly("mlx_lm.generate")
    if attr == "_call":
        step_params = _params(getattr(generate, "generate_step", None))
        return "formatter" in names and "formatter" not in step_params and "**" not in step_params
    utils = _import_quietly("mlx_lm.utils")
    return "generate_step" in names and not hasattr(utils, "generate_step")


def _params(func: Any) -> set[str]:
    import inspect

    if func is None:
        return set()
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return {"**"}
    return {"**" if p.kind is p.VAR_KEYWORD else p.name for p in params}


def _langchain_build(owner: type, attr: str, original: Any) -> Any:
    from metal_guard.knowledge import _langchain_mlx as impl

    func: Callable[..., Any]
    if owner.__name__ == "ChatMLX":
        func = impl.chat_stream
    else:
        func = impl.pipeline_call if attr == "_call" else impl.pipeline_stream

    if attr == "_stream":
        def replacement(self: Any, *args: Any, **kwargs: Any) -> Any:  # a generator, like the original
            yield from func(self, *args, **kwargs)
    else:
        def replacement(self: Any, *args: Any, **kwargs: Any) -> Any:
            return func(self, *args, **kwargs)

    replacement.__name__ = replacement.__qualname__ = attr
    replacement.__doc__ = func.__doc__
    setattr(replacement, MARKER, attr)
    return replacement


#: The patches, in installation order.
PATCHES: tuple[Patch, ...] = (
    Patch("mlx_lm_1128_think_start_id", "mlx-lm", "mlx_lm_1128_think_start_id",
          "None-safe TokenizerWrapper.think_start_id/think_end_id (mlx-lm#1128)",
          _tokenizer_targets, _think_broken, _think_build, modules=("mlx_lm.tokenizer_utils",)),
    Patch("langchain_mlx_pipeline", "langchain-community", "langchain_mlx_pipeline",
          "MLXPipeline._call/_stream on stream_generate (mlx-lm >= 0.32)",
          _pipeline_targets, _langchain_broken, _langchain_build, requires=("mlx-lm",),
          modules=("langchain_community.llms.mlx_pipeline",)),
    Patch("langchain_chat_mlx", "langchain-community", "langchain_mlx_pipeline",
          "ChatMLX._stream on stream_generate (mlx-lm >= 0.32)",
          _chat_targets, _langchain_broken, _langchain_build, requires=("mlx-lm",),
          modules=("langchain_community.chat_models.mlx",)),
)

_lock = threading.RLock()
_installed: dict[str, list[_Replacement]] = {}


# --------------------------------------------------------------------------- splicing


def _proxy_type() -> type | None:
    try:
        import wrapt
    except ImportError:  # pragma: no cover - wrapt is a dependency
        return None
    return wrapt.BaseObjectProxy  # type: ignore[no-any-return]


def _chain(owner: type, attr: str) -> tuple[list[Any], Any]:
    """``([proxy, ...], innermost)`` for the attribute in ``owner.__dict__``."""
    proxy = _proxy_type()
    node: Any = owner.__dict__.get(attr)
    proxies: list[Any] = []
    while proxy is not None and isinstance(node, proxy):
        proxies.append(node)
        node = getattr(node, "__wrapped__")  # noqa: B009 - mypy narrows node to object
    return proxies, node


def _set_innermost(owner: type, attr: str, value: Any) -> None:
    proxies, _ = _chain(owner, attr)
    if proxies:
        proxies[-1].__wrapped__ = value
    else:
        setattr(owner, attr, value)


def _still_installed(reps: Iterable[_Replacement]) -> bool:
    return all(_chain(r.owner, r.attr)[1] is r.new for r in reps)


# --------------------------------------------------------------------------- public API


def _installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _gate(patch: Patch) -> str | None:
    """``None`` when the version gate passes, else the reason it does not."""
    from metal_guard.knowledge.advisories import advisory_for_patch, check_version_advisories

    advisory = advisory_for_patch(patch.gate)
    if advisory is None:
        return None
    hits = check_version_advisories(min_severity="info")
    if any(a["id"] == advisory["id"] for a in hits):
        return None
    return (f"installed versions are outside the advisory range ({advisory['package']} "
            f"{advisory['affected']}, {advisory['issue']})")


def _install_one(patch: Patch, force: bool, only_imported: bool) -> PatchState:
    if patch.name in _installed and _still_installed(_installed[patch.name]):
        return PatchState(APPLIED, "already installed")
    if only_imported:
        missing = [m for m in patch.modules if m not in sys.modules]
        if missing:
            return PatchState(UNAVAILABLE, f"{', '.join(missing)} not imported yet (only_imported=True)")
    for package in (patch.package, *patch.requires):
        if _installed_version(package) is None:
            return PatchState(UNAVAILABLE, f"{package} is not installed")
    if not force:
        reason = _gate(patch)
        if reason:
            return PatchState(NOT_NEEDED, reason)
    try:
        targets = patch.targets()
        broken = [(o, a, _chain(o, a)[1]) for o, a in targets]
        broken = [(o, a, orig) for o, a, orig in broken if patch.broken(o, a, orig)]
    except _Unavailable as exc:
        return PatchState(UNAVAILABLE, str(exc))
    except Exception as exc:
        log.warning("defensive patch %s: probe failed: %s", patch.name, exc, exc_info=True)
        return PatchState(FAILED, f"probe failed: {type(exc).__name__}: {exc}")
    if not broken:
        return PatchState(NOT_NEEDED, "the installed code does not have the bug")
    done: list[_Replacement] = []
    try:
        for owner, attr, original in broken:
            new = patch.build(owner, attr, original)
            _set_innermost(owner, attr, new)
            done.append(_Replacement(owner, attr, original, new))
    except Exception as exc:
        for rep in reversed(done):
            _set_innermost(rep.owner, rep.attr, rep.original)
        log.warning("defensive patch %s failed: %s", patch.name, exc, exc_info=True)
        return PatchState(FAILED, f"{type(exc).__name__}: {exc}")
    _installed[patch.name] = done
    log.info("defensive patch %s applied: %s", patch.name,
             ", ".join(f"{r.owner.__name__}.{r.attr}" for r in done))
    return PatchState(APPLIED, "patched " + ", ".join(f"{r.owner.__name__}.{r.attr}" for r in done))


def _select(patches: Iterable[str] | None) -> tuple[Patch, ...]:
    if patches is None:
        return PATCHES
    wanted = list(patches)
    known = {p.name for p in PATCHES}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown patch(es) {unknown}; known: {sorted(known)}")
    return tuple(p for p in PATCHES if p.name in wanted)


def install_upstream_defensive_patches(
    force: bool = False, *, patches: Iterable[str] | None = None, only_imported: bool = False
) -> dict[str, PatchState]:
    """Install the defensive patches (all, or the names in ``patches``); idempotent.

    Returns ``{patch name: PatchState}``; each state is ``"applied"``, ``"not-needed"``,
    ``"unavailable"`` or ``"failed"`` with a ``reason``. ``force=True`` skips the version gate
    (the feature probe still decides). ``only_imported=True`` never imports a target module:
    a patch whose module is not imported yet is ``"unavailable"`` (for post-import hooks and
    start-up code that must stay cheap). Thread-safe.
    """
    with _lock:
        return {p.name: _install_one(p, force, only_imported) for p in _select(patches)}


def uninstall_upstream_defensive_patches(*, patches: Iterable[str] | None = None) -> dict[str, str]:
    """Put the original attributes back. Returns ``{name: "removed" | "not-installed" |
    "replaced-by-someone-else"}``; in the last case the foreign attribute is left alone."""
    out: dict[str, str] = {}
    with _lock:
        for patch in _select(patches):
            reps = _installed.pop(patch.name, None)
            if not reps:
                out[patch.name] = "not-installed"
                continue
            state = "removed"
            for rep in reversed(reps):
                if _chain(rep.owner, rep.attr)[1] is rep.new:
                    _set_innermost(rep.owner, rep.attr, rep.original)
                else:
                    state = "replaced-by-someone-else"
            out[patch.name] = state
    return out


def defensive_patch_status() -> dict[str, bool]:
    """``{patch name: currently installed}`` (no imports, no probing)."""
    with _lock:
        return {p.name: bool(_installed.get(p.name)) and _still_installed(_installed[p.name])
                for p in PATCHES}
