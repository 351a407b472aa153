"""Distributed ranks: which rank of which job this process is, without importing MLX.

``mlx.launch`` starts one process per rank and tells each one who it is through the
environment; MLX's backends read the same variables when ``mx.distributed.init()`` runs:

* **ring** — ``MLX_RANK`` and ``MLX_HOSTFILE`` (a temporary file holding a JSON list with one
  entry per rank; empty for a single host), written by the launcher for every rank;
* **jaccl** — ``MLX_RANK``, ``MLX_JACCL_COORDINATOR`` and ``MLX_IBV_DEVICES`` (a JSON file with
  one row per rank);
* **nccl** — ``MLX_RANK``, ``MLX_WORLD_SIZE``, ``NCCL_HOST_IP`` / ``NCCL_PORT``;
* **mpi** — ``OMPI_COMM_WORLD_RANK`` / ``OMPI_COMM_WORLD_SIZE`` (Open MPI) or ``PMI_RANK`` /
  ``PMI_SIZE`` (MPICH).

:func:`detect` reads those (MLX's variables, not ours; our own ``METALGUARD_JOB_ID`` comes
through :mod:`metal_guard.settings`). Code that already holds an initialised group can
:func:`register_group` it instead. Importing this module and calling :func:`detect` never
imports MLX.

**The job key.** The ranks of one job must agree on a key that a different job does not share.
``METALGUARD_JOB_ID`` wins when set (pass it with ``mlx.launch --env METALGUARD_JOB_ID=...``
for multi-host jobs whose hosts share ``METALGUARD_HOME``). Otherwise it is a hash of the
job's topology (the ring hostfile's content, the jaccl coordinator and device table, the
nccl rendezvous, the MPI namespace), which every rank of one job sees identically. Two runs
of the same command have the same topology key; cadence tells them apart by the ranks each
entry has already seen (see :mod:`metal_guard.cadence`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("metal_guard.distributed")

__all__ = ["RankInfo", "clear_registered_group", "current", "detect", "rank_fields",
           "register_group"]

#: A hostfile / device table larger than this is not a launcher's file: ignored.
MAX_TOPOLOGY_FILE_BYTES = 256 * 1024
#: Ranks and world sizes above this are not believed (a hostile or garbled environment).
MAX_WORLD_SIZE = 65536


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a distributed job.

    ``backend`` is ``ring``/``jaccl``/``nccl``/``mpi``/``registered``; ``world_size`` is
    ``None`` when the environment does not say; ``job`` is the job key (see the module doc)
    and ``job_source`` where it came from (``METALGUARD_JOB_ID`` or ``topology``).
    """

    rank: int
    world_size: int | None
    backend: str
    job: str
    job_source: str

    @property
    def is_multi_rank(self) -> bool:
        return self.world_size is None or self.world_size > 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_registered: RankInfo | None = None
_registered_lock = threading.Lock()


def register_group(group: Any = None, *, rank: int | None = None, world_size: int | None = None,
                   job: str | None = None) -> RankInfo:
    """Tell metal-guard about an initialised group (``mx.distributed.init()``'s result, or
    ``rank=``/``world_size=``). The job key is taken from :func:`detect` when the launcher's
    environment names one, else from ``job`` (default ``"registered"``)."""
    if group is not None:
        rank, world_size = int(group.rank()), int(group.size())
    if rank is None or world_size is None:
        raise ValueError("register_group() needs a group or both rank= and world_size=")
    _check_int("rank", rank, 0, MAX_WORLD_SIZE - 1)
    _check_int("world_size", world_size, 1, MAX_WORLD_SIZE)
    if rank >= world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    found = detect(include_registered=False)
    key = found.job if found is not None else _clean_job(job or "registered")
    source = found.job_source if found is not None else "registered"
    info = RankInfo(rank, world_size, "registered", key, source)
    global _registered
    with _registered_lock:
        _registered = info
    return info


def clear_registered_group() -> None:
    global _registered
    with _registered_lock:
        _registered = None


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a whole number in [{lo}, {hi}], not {value!r}")


def _int_env(env: Mapping[str, str], name: str, lo: int = 0) -> int | None:
    raw = env.get(name)
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isdigit() or len(raw) > 6:
        log.debug("ignoring %s=%r: not a small whole number", name, raw[:40])
        return None
    value = int(raw)
    return value if lo <= value <= MAX_WORLD_SIZE else None


def _read_small_file(path: str) -> str | None:
    """The text of a launcher's temporary file: a regular file, no symlink, bounded size."""
    if not path or "\x00" in path:
        return None
    from metal_guard.storage import NotAStateFile, open_regular, read_fd

    try:
        opened = open_regular(path)
    except (OSError, NotAStateFile):
        return None
    if opened is None:
        return None
    fd, st = opened
    try:
        if st.st_size > MAX_TOPOLOGY_FILE_BYTES:
            return None
        data = read_fd(fd, MAX_TOPOLOGY_FILE_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_TOPOLOGY_FILE_BYTES:
        return None
    return data.decode("utf-8", "replace")


def _json_list_len(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.strip():
        return 1  # mlx.launch writes an empty hostfile for a one-host ring
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return len(value) if isinstance(value, list) and 0 < len(value) <= MAX_WORLD_SIZE else None


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8", "replace")).hexdigest()[:16]


def _clean_job(raw: str) -> str:
    text = "".join(ch for ch in raw.strip() if ch.isprintable() and ch not in "|\n\r")
    return text[:100] or "job"


def detect(env: Mapping[str, str] | None = None, *, job_id: str | None = None,
           include_registered: bool = True) -> RankInfo | None:
    """This process's :class:`RankInfo`, or ``None`` when it is not a rank of a launched job.

    ``env`` defaults to ``os.environ``; ``job_id`` overrides the job key (the policy passes
    the ``METALGUARD_JOB_ID`` setting). A group given to :func:`register_group` wins.
    """
    if include_registered and _registered is not None:
        if job_id:
            return RankInfo(_registered.rank, _registered.world_size, _registered.backend,
                            _clean_job(job_id), "METALGUARD_JOB_ID")
        return _registered
    source = os.environ if env is None else env
    found = _from_mlx_env(source) or _from_mpi_env(source)
    if found is None:
        return None
    rank, world, backend, topology = found
    if world is not None and rank >= world:
        log.debug("ignoring rank %d outside a world of %d", rank, world)
        return None
    if job_id:
        return RankInfo(rank, world, backend, _clean_job(job_id), "METALGUARD_JOB_ID")
    return RankInfo(rank, world, backend, f"{backend}:{topology}", "topology")


def _from_mlx_env(env: Mapping[str, str]) -> tuple[int, int | None, str, str] | None:
    rank = _int_env(env, "MLX_RANK")
    if rank is None:
        return None
    if "MLX_JACCL_COORDINATOR" in env or "MLX_IBV_DEVICES" in env:
        table = _read_small_file(env.get("MLX_IBV_DEVICES", ""))
        world = _json_list_len(table) if table is not None else _int_env(env, "MLX_WORLD_SIZE", 1)
        return rank, world, "jaccl", _digest(env.get("MLX_JACCL_COORDINATOR", ""), table or "")
    if "MLX_HOSTFILE" in env:
        hosts = _read_small_file(env.get("MLX_HOSTFILE", ""))
        world = _json_list_len(hosts)
        return rank, world, "ring", _digest("ring", hosts or env.get("MLX_HOSTFILE", ""))
    world = _int_env(env, "MLX_WORLD_SIZE", 1)
    rendezvous = f"{env.get('NCCL_HOST_IP', '')}:{env.get('NCCL_PORT', '')}"
    backend = "nccl" if "NCCL_HOST_IP" in env else "mlx"
    return rank, world, backend, _digest(backend, rendezvous, str(world))


def _from_mpi_env(env: Mapping[str, str]) -> tuple[int, int | None, str, str] | None:
    for rank_var, size_var in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                               ("PMI_RANK", "PMI_SIZE")):
        rank = _int_env(env, rank_var)
        if rank is None:
            continue
        world = _int_env(env, size_var, 1)
        namespace = (env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_ess_base_jobid")
                     or env.get("PMI_JOBID") or "")
        return rank, world, "mpi", _digest("mpi", namespace[:200], str(world))
    return None


def current(settings: Any = None) -> RankInfo | None:
    """:func:`detect` with the ``METALGUARD_JOB_ID`` setting applied; ``None`` off a job.
    Never raises (a broken environment is "not a rank")."""
    try:
        job_id = None
        if settings is None:
            from metal_guard.settings import get_settings

            settings = get_settings()
        job_id = getattr(settings, "job_id", None)
        return detect(job_id=job_id)
    except Exception as exc:  # rank detection must never break a guarded call
        log.debug("rank detection failed: %s", exc)
        return None


#: The variables :func:`detect` reads; :func:`rank_fields` caches its answer per their values.
_ENV_KEYS = ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "MLX_JACCL_COORDINATOR",
             "MLX_IBV_DEVICES", "NCCL_HOST_IP", "NCCL_PORT", "OMPI_COMM_WORLD_RANK",
             "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE")
_fields_cache: tuple[tuple[Any, ...], dict[str, int]] | None = None


def rank_fields() -> dict[str, int]:
    """``{"rank": r, "world_size": n}`` for breadcrumbs and heartbeats; ``{}`` off a job.
    Reads only the launcher's variables (no settings); cached per their values."""
    global _fields_cache
    key = (_registered, *(os.environ.get(k) for k in _ENV_KEYS))
    cached = _fields_cache
    if cached is not None and cached[0] == key:
        return dict(cached[1])
    try:
        info = detect()
    except Exception:
        info = None
    out: dict[str, int] = {}
    if info is not None:
        out["rank"] = info.rank
        if info.world_size is not None:
            out["world_size"] = info.world_size
    _fields_cache = (key, out)
    return dict(out)
