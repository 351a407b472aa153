"""What machine is this? Device info, GPU family, tiers, recommended config, audits.

The portable API: :func:`detect_hardware`, :func:`recommended_config`, :func:`apple_gpu_family`,
:func:`system_memory`, :func:`process_footprint_bytes`, :func:`audit_wired_limit`,
:func:`read_gpu_driver_version`. The macOS readers they use (sysctl, ``vm_stat``, swap, the
pressure level, ``proc_pid_rusage``, ``kmutil``/``kextstat``/``ioreg``) live in
:mod:`metal_guard.macos`; they take an injectable ``runner`` so everything here is tested on
captured real outputs on any OS, and off macOS they answer "unknown" without spawning anything.
Linux memory numbers come from psutil.

Units: bytes internally; ``*_gb`` fields are decimal GB (1e9). Tier boundaries are physical
memory in GiB, because a "16 GB" Mac has 16 GiB.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from metal_guard import backend
from metal_guard.macos import PRESSURE_NAMES as PRESSURE_NAMES
from metal_guard.macos import CommandRunner as CommandRunner
from metal_guard.macos import Footprint as Footprint
from metal_guard.macos import gpu_accelerator_stats as gpu_accelerator_stats
from metal_guard.macos import (
    is_darwin,
    memory_from_commands,
    read_iogpu_kext_version,
    read_sysctl_int,
)
from metal_guard.macos import memory_pressure_level as memory_pressure_level
from metal_guard.macos import (
    parse_ioreg_performance_statistics as parse_ioreg_performance_statistics,
)
from metal_guard.macos import parse_kext_version as parse_kext_version
from metal_guard.macos import parse_swapusage as parse_swapusage
from metal_guard.macos import parse_sysctl as parse_sysctl
from metal_guard.macos import parse_vm_stat as parse_vm_stat
from metal_guard.macos import read_sysctl as read_sysctl
from metal_guard.macos import run_command as run_command
from metal_guard.macos import rusage_footprint as rusage_footprint

log = logging.getLogger("metal_guard.hardware")

GIB = 1 << 30
GB = 1_000_000_000
WIRED_LIMIT_ADVISORY_RATIO = 0.85
_GPU_FAMILIES = {13: "M1", 14: "M2", 15: "M3", 16: "M4", 17: "M5"}
_VARIANTS = {"p": "phone", "g": "base/pro", "s": "pro/max", "d": "ultra"}


# --------------------------------------------------------------------------- footprint


@functools.lru_cache(maxsize=1)
def _own_process() -> Any:
    import psutil

    return psutil.Process(os.getpid())


def process_footprint(pid: int | None = None) -> Footprint | None:
    """Footprint of ``pid`` (default: this process): ``ri_phys_footprint`` on macOS — the number
    jetsam enforces, Metal buffers included — else psutil RSS. ``None`` if the pid is gone."""
    target = os.getpid() if pid is None else int(pid)
    found = rusage_footprint(target)
    if found is not None:
        return found
    try:
        import psutil

        proc = _own_process() if target == os.getpid() else psutil.Process(target)
        if target == os.getpid() and proc.pid != target:  # forked since the cache was filled
            _own_process.cache_clear()
            proc = _own_process()
        return Footprint(target, int(proc.memory_info().rss), None, "psutil_rss")
    except Exception as exc:  # NoSuchProcess, AccessDenied, ZombieProcess
        log.debug("footprint of pid %s unavailable: %s", target, exc)
        return None


def process_footprint_bytes(pid: int | None = None) -> int | None:
    """The footprint of ``pid`` (default: this process) in bytes, or ``None`` if unreadable."""
    found = process_footprint(pid)
    return found.footprint_bytes if found else None


# --------------------------------------------------------------------------- system memory


@dataclass(frozen=True)
class SystemMemory:
    """Machine-wide memory. ``pressure`` is ``normal``/``warn``/``critical``/``unknown``;
    ``pressure_source`` is ``kernel`` (macOS level) or ``derived`` (from available memory)."""

    total_bytes: int | None
    available_bytes: int | None
    swap_total_bytes: int | None
    swap_used_bytes: int | None
    pressure_level: int | None
    pressure: str
    pressure_source: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _derived_pressure(total: int | None, available: int | None) -> str:
    if not total or available is None:
        return "unknown"
    frac = available / total
    return "critical" if frac < 0.05 else "warn" if frac < 0.10 else "normal"


def system_memory(*, runner: CommandRunner | None = None) -> SystemMemory:
    """Total/available RAM, swap and the pressure verdict.

    With ``runner`` the macOS commands are parsed (``hw.memsize``, ``vm_stat``, ``vm.swapusage``,
    the pressure sysctl); otherwise psutil plus, on macOS, the in-process pressure sysctl.
    """
    total = available = swap_total = swap_used = None
    if runner is not None:
        total, available, swap_total, swap_used = memory_from_commands(runner)
    else:
        try:
            import psutil

            vmem = psutil.virtual_memory()
            total, available = int(vmem.total), int(vmem.available)
            sw = psutil.swap_memory()
            swap_total, swap_used = int(sw.total), int(sw.used)
        except Exception as exc:
            log.debug("psutil memory read failed: %s", exc)
    level = memory_pressure_level(runner=runner) if (runner is not None or is_darwin()) else None
    if level is not None:
        pressure, source = PRESSURE_NAMES.get(level, "unknown"), "kernel"
    else:
        pressure, source = _derived_pressure(total, available), "derived"
    return SystemMemory(total, available, swap_total, swap_used, level, pressure, source)


# --------------------------------------------------------------------------- GPU family


def gpu_family_from_architecture(architecture: str | None) -> dict[str, Any]:
    """``applegpu_g16s`` → ``{"family": "M4", "generation": 16, "variant": "pro/max"}``.

    The suffix letter only sizes command buffers in MLX (an M4 Pro reports ``s``), so
    ``variant`` is a hint, not the product tier. Anything unrecognised is ``"unknown"``.
    """
    arch = (architecture or "").strip().lower()
    match = re.match(r"^applegpu_g(\d+)([a-z]*)$", arch)
    if not match:
        return {"family": "unknown", "generation": None, "variant": None}
    gen, suffix = int(match.group(1)), match.group(2)
    return {
        "family": _GPU_FAMILIES.get(gen, "unknown"),
        "generation": gen,
        "variant": _VARIANTS.get(suffix[-1:]) if suffix else None,
    }


def _gb(value: Any) -> float | None:
    return round(value / GB, 3) if isinstance(value, int) and value > 0 else None


def apple_gpu_family(info: dict[str, Any] | None = None, *, load: bool = True) -> dict[str, Any]:
    """Describe the Apple GPU from ``mx.device_info()`` (or ``info`` when given).

    Keys: ``available``, ``device_name``, ``architecture`` (raw), ``family`` (M1..M5 or
    ``unknown``), ``generation``, ``variant``, ``resource_limit_descriptors`` (MLX's buffer-count
    cap, the mlx-lm#1185 499000), ``max_buffer_length_bytes``/``_gb``,
    ``max_recommended_working_set_bytes``/``_gb``, ``memory_size_bytes``/``_gb`` (decimal GB).
    """
    if info is None:
        info = backend.device_info(load=load)
    if not info:
        return {"available": False, "device_name": None, "architecture": None,
                "family": "unknown", "generation": None, "variant": None,
                "resource_limit_descriptors": None, "error": "MLX device info unavailable"}
    out: dict[str, Any] = {"available": True, "device_name": info.get("device_name"),
                           "architecture": info.get("architecture")}
    out.update(gpu_family_from_architecture(str(info.get("architecture") or "")))
    limit = info.get("resource_limit")
    out["resource_limit_descriptors"] = int(limit) if isinstance(limit, int) else None
    for key, name in (("max_buffer_length", "max_buffer_length"),
                      ("max_recommended_working_set_size", "max_recommended_working_set"),
                      ("memory_size", "memory_size")):
        value = info.get(key)
        out[name + "_bytes"] = value if isinstance(value, int) else None
        out[name + "_gb"] = _gb(value)
    return out


# --------------------------------------------------------------------------- tiers


@functools.lru_cache(maxsize=1)
def tier_table() -> list[dict[str, Any]]:
    """The tier rows of ``data/hardware_tiers.json`` (ordered, smallest first)."""
    raw = resources.files("metal_guard").joinpath("data/hardware_tiers.json").read_text("utf-8")
    return list(json.loads(raw)["tiers"])


def tier_for_memory(total_bytes: int | None) -> dict[str, Any]:
    """The tier row for a machine with ``total_bytes`` of RAM (unknown → the lowest tier)."""
    rows = tier_table()
    if not total_bytes:
        return dict(rows[0])
    gib = total_bytes / GIB
    for row in rows:
        if row["max_memory_gib"] is None or gib <= row["max_memory_gib"] + 0.5:
            return dict(row)
    return dict(rows[-1])


def _cpu_name(runner: CommandRunner | None) -> str | None:
    return _local_cpu_name() if runner is None else read_sysctl("machdep.cpu.brand_string", runner=runner)


@functools.lru_cache(maxsize=1)
def _local_cpu_name() -> str | None:
    name = read_sysctl("machdep.cpu.brand_string")
    if name:
        return name
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or None


def detect_hardware(
    *, runner: CommandRunner | None = None, info: dict[str, Any] | None = None,
    load: bool = True, include_driver: bool = True,
) -> dict[str, Any]:
    """Memory, chip, GPU family and tier of this machine.

    ``load=False`` never imports MLX (uses it only if already imported). Seed keys
    ``gpu_memory_gb``, ``chip``, ``recommended_working_set_gb``, ``tier``, ``gpu_driver_version``
    are kept (decimal GB); ``*_bytes`` fields carry the exact values and ``*_source`` fields say
    where each came from. On Linux, memory comes from psutil (never 0).
    """
    if info is None:
        info = backend.device_info(load=load) or {}
    total, total_source = info.get("memory_size"), "mlx_device_info"
    if not isinstance(total, int) or total <= 0:
        total, total_source = read_sysctl_int("hw.memsize", runner), "sysctl"
    if not total and runner is None:
        try:
            import psutil

            total, total_source = int(psutil.virtual_memory().total), "psutil"
        except Exception:
            total, total_source = None, "unknown"
    working_set = info.get("max_recommended_working_set_size") or info.get("total_memory")
    ws_source = "mlx_device_info" if working_set else "unknown"
    if not working_set and total and (runner is not None or is_darwin()):
        working_set, ws_source = int(total * 0.75), "estimate_75pct"
    family = gpu_family_from_architecture(str(info.get("architecture") or ""))
    tier = tier_for_memory(total)
    chip = info.get("device_name") if family["family"] != "unknown" else None
    return {
        "chip": chip or _cpu_name(runner),
        "gpu_family": family["family"],
        "gpu_memory_gb": _gb(total),
        "memory_total_bytes": total or None,
        "memory_total_source": total_source,
        "recommended_working_set_gb": _gb(working_set),
        "recommended_working_set_bytes": working_set or None,
        "recommended_working_set_source": ws_source,
        "tier": tier["name"],
        "backend": backend.backend_name(load=False),
        "platform": sys.platform,
        "gpu_driver_version": read_gpu_driver_version(runner=runner) if include_driver else None,
    }


def recommended_config(hardware: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tier's defaults merged with the hardware description.

    These are the values metal-guard itself uses when a caller passes no explicit value:
    watchdog warn/critical %, KV headroom and growth warning, ``safe_cleanup`` cooldown and the
    fit-check overhead.
    """
    hw = hardware if hardware is not None else detect_hardware(load=False, include_driver=False)
    row = tier_for_memory(hw.get("memory_total_bytes"))
    row.pop("max_memory_gib", None)
    row.pop("name", None)
    return {**hw, **row}


# --------------------------------------------------------------------------- audits


def audit_wired_limit(*, runner: CommandRunner | None = None) -> dict[str, Any]:
    """Check ``iogpu.wired_limit_mb`` against RAM (mlx-lm#1047).

    ``mode`` is ``default`` (0 = the OS policy), ``override`` or ``unknown``; ``advisory`` is set
    when an override wires more than 85 % of RAM.
    """
    limit_mb = read_sysctl_int("iogpu.wired_limit_mb", runner)
    total = read_sysctl_int("hw.memsize", runner)
    result: dict[str, Any] = {"limit_mb": limit_mb, "limit_bytes": None, "total_bytes": total,
                              "total_gb": _gb(total), "ratio": None, "mode": "unknown",
                              "advisory": None}
    if limit_mb is None:
        return result
    if limit_mb == 0:
        result["mode"] = "default"
        return result
    result["mode"] = "override"
    result["limit_bytes"] = limit_mb * (1 << 20)
    if total:
        ratio = result["limit_bytes"] / total
        result["ratio"] = round(ratio, 4)
        if ratio > WIRED_LIMIT_ADVISORY_RATIO:
            result["advisory"] = (
                f"iogpu.wired_limit_mb={limit_mb} wires {ratio:.0%} of RAM (> "
                f"{WIRED_LIMIT_ADVISORY_RATIO:.0%}); the OS has little left when a model fills the "
                "GPU. Consider `sudo sysctl iogpu.wired_limit_mb=0` (see mlx-lm#1047)."
            )
    return result


def read_gpu_driver_version(*, runner: CommandRunner | None = None, timeout: float = 3.0) -> str | None:
    """The IOGPUFamily kext version (mlx#3186 correlates panics with it), or ``None``.

    Tries ``kmutil showloaded``, then the deprecated ``kextstat``, then ``ioreg``. Without a runner
    it only runs on macOS and is cached for the life of the process.
    """
    return read_iogpu_kext_version(runner=runner, timeout=timeout)


def log_system_audit_at_startup(*, runner: CommandRunner | None = None) -> dict[str, Any]:
    """Run the wired-limit audit and read the driver version; log a WARNING on an advisory.

    Off macOS (and without a runner) this logs nothing above DEBUG.
    """
    wired = audit_wired_limit(runner=runner)
    driver = read_gpu_driver_version(runner=runner)
    if wired.get("advisory"):
        log.warning("metal-guard system audit: %s", wired["advisory"])
    elif wired["mode"] != "unknown" or driver:
        log.info("metal-guard system audit: wired limit %s (%s MB), IOGPUFamily %s",
                 wired["mode"], wired["limit_mb"], driver or "unknown")
    else:
        log.debug("metal-guard system audit: not macOS or sysctl unavailable")
    return {"wired_limit": wired, "gpu_driver_version": driver}
