"""What the L8 lock reports: who holds it, and what an acquire got.

* :class:`LockHolder` — who holds the lock: :func:`~metal_guard.lock.read_mlx_lock`'s answer,
  :attr:`MLXLockConflict.holder <metal_guard.errors.MLXLockConflict>`, the record of a hold
  this process took (``acquired=True``, with its ``depth``), and the ``holder`` of a
  :class:`LockNotAcquired`.
* :class:`LockNotAcquired` — an acquire that let the caller through without taking the lock:
  observer mode (``observer=True``) or a rank of the job that holds it (``job_shared=True``).

Both are frozen dataclasses with ``as_dict()`` for JSON and the read-only mapping view that
0.x callers used (``holder["pid"]``, ``info.get("acquired")``). The view shows the keys each
shape always had: a verified holder its sidecar description (``create_time``, ``cmdline``,
``started_at``, ``host``, ``elapsed_s``), an unverified one its ``reason`` and the
``claimed`` sidecar, a hold of this process ``acquired`` and ``depth``.

A sidecar is written by another process: :meth:`LockHolder.from_mapping` keeps only the
known fields, of the right type, with text capped; anything else in the file is dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from metal_guard._results import ResultRecord

__all__ = ["LockHolder", "LockNotAcquired", "LockResult"]

#: Fields a verified holder's sidecar describes (not shown for an unverified holder).
_VERIFIED_ONLY = frozenset({"create_time", "cmdline", "started_at", "host", "elapsed_s"})
#: Fields that explain an unverified holder (not shown for a verified one).
_UNVERIFIED_ONLY = frozenset({"reason", "claimed"})
#: Fields of a hold this process took.
_OWN_ONLY = frozenset({"acquired", "depth"})
#: Caps on text read from a sidecar (ours are far shorter).
_TEXT_MAX = {"label": 200, "cmdline": 500, "host": 255, "started_at": 64, "job": 200,
             "lock_path": 4096, "reason": 500, "force_refused": 500}
_OMIT = {"omit_none": True}
#: What a holder writes about itself in ``<lock>.holder.json``.
SIDECAR_FIELDS = ("pid", "create_time", "label", "cmdline", "started_at", "host", "lock_path",
                  "job", "reclaimed_from")


@dataclass(frozen=True, eq=False, kw_only=True)
class LockHolder(ResultRecord):
    """Who holds the cross-process MLX lock (a free lock is ``None``, never a record).

    Believe ``pid`` only when ``verified`` is true: the sidecar's pid and create_time match a
    live process that owns the kernel lock. An unverified holder has ``pid=None`` and says
    why in ``reason``; ``claimed`` is what its sidecar said (untrusted).
    """

    held: bool = True
    verified: bool = False
    held_by_this_process: bool = False
    pid: int | None = None
    label: str | None = None
    lock_path: str | None = None
    create_time: float | None = None
    cmdline: str | None = None
    #: ISO 8601 UTC time the holder took the lock
    started_at: str | None = None
    host: str | None = None
    #: seconds since ``started_at`` when this record was made
    elapsed_s: float | None = None
    #: the distributed job whose ranks share this hold
    job: str | None = field(default=None, metadata=_OMIT)
    #: the holder ``force=True`` took the lock from (``pid``, ``label``, ``started_at``)
    reclaimed_from: dict[str, Any] | None = field(default=None, metadata=_OMIT)
    #: why the holder is not verified
    reason: str | None = None
    #: the unverified sidecar's content, as found
    claimed: dict[str, Any] | None = None
    #: true on the record of a hold this process took
    acquired: bool = False
    #: this process's reference count on its hold
    depth: int | None = None
    #: why ``force=True`` did not signal the holder
    force_refused: str | None = field(default=None, metadata=_OMIT)
    #: the holder did not let go within ``MLX_FORCE_WAIT_SEC`` of SIGTERM
    force_timeout: bool | None = field(default=None, metadata=_OMIT)
    #: the holder could not be signalled (permission)
    force_permission_denied: bool | None = field(default=None, metadata=_OMIT)

    def _keys(self) -> list[str]:
        hidden = set(_UNVERIFIED_ONLY if self.verified else _VERIFIED_ONLY)
        if not self.held_by_this_process:
            hidden |= _OWN_ONLY
        return [key for key in super()._keys() if key not in hidden]

    def replace(self, **changes: Any) -> LockHolder:
        """A copy with ``changes`` applied (records are frozen)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_sidecar(cls, claim: Mapping[str, Any], path: Any, *, held_by_this_process: bool,
                     depth: int | None = None) -> LockHolder:
        """The record of a *verified* holder described by sidecar ``claim`` of the lock at
        ``path``: only the sidecar's own fields are taken from it (:data:`SIDECAR_FIELDS`)."""
        from metal_guard.lock_holder import elapsed_s

        own = {key: claim[key] for key in SIDECAR_FIELDS if key in claim}
        if not isinstance(own.get("lock_path"), str):
            own["lock_path"] = str(path)
        extra: dict[str, Any] = {"acquired": True, "depth": depth} if held_by_this_process else {}
        return cls.from_mapping(own, held=True, verified=True,
                                held_by_this_process=held_by_this_process,
                                elapsed_s=elapsed_s(own.get("started_at")), **extra)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], **overrides: Any) -> LockHolder:
        """A record from a sidecar or an 0.x holder dict: known fields of the right type
        only, text capped, everything else dropped; ``overrides`` win."""
        merged = {**data, **overrides}
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in merged:
                value = _clean(f.name, merged[f.name])
                if value is not None or f.default is None:
                    values[f.name] = value
        return cls(**values)


@dataclass(frozen=True, eq=False, kw_only=True)
class LockNotAcquired(ResultRecord):
    """An acquire that lets the caller through without taking the lock.

    ``observer=True``: observer mode, the lock is held elsewhere and the block runs without it.
    ``job_shared=True``: a verified rank of the same distributed ``job`` holds it, and the
    block runs under that hold. ``holder`` is who holds the lock.
    """

    acquired: bool = False
    #: the caller's label
    label: str
    lock_path: str
    holder: LockHolder
    observer: bool | None = field(default=None, metadata=_OMIT)
    job_shared: bool | None = field(default=None, metadata=_OMIT)
    job: str | None = field(default=None, metadata=_OMIT)


#: What :func:`~metal_guard.lock.acquire_mlx_lock` returns and
#: :func:`~metal_guard.lock.mlx_exclusive_lock` yields: the hold taken (a :class:`LockHolder`
#: with ``acquired=True``) or a :class:`LockNotAcquired`. Both answer ``.acquired``.
LockResult = LockHolder | LockNotAcquired


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _clean(name: str, value: Any) -> Any:
    """``value`` if it has the type field ``name`` expects (text capped), else ``None``."""
    if value is None:
        return None
    if name in ("held", "verified", "held_by_this_process", "acquired", "force_timeout",
                "force_permission_denied"):
        return value if isinstance(value, bool) else None
    if name in ("pid", "depth"):
        return value if _is_int(value) else None
    if name in ("create_time", "elapsed_s"):
        return float(value) if _is_int(value) or isinstance(value, float) else None
    if name == "claimed":
        return dict(value) if isinstance(value, Mapping) else None
    if name == "reclaimed_from":
        if not isinstance(value, Mapping):
            return None
        return {key: _clean(key, value.get(key)) for key in ("pid", "label", "started_at")}
    if isinstance(value, str):
        return value[:_TEXT_MAX.get(name, 500)]
    return None
