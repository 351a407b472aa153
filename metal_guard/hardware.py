"""What machine is this? Device info, GPU family, tiers, and the macOS readers.

Readers that shell out (``sysctl``, ``vm_stat``, ``kmutil``/``kextstat``, ``ioreg``) take an
injectable ``runner`` — ``runner(argv, timeout) -> stdout | None`` — so the parsers are tested on
captured real outputs on any OS. With no runner, a reader on macOS uses a fast in-process path
where one exists (``sysctlbyname``, ``proc_pid_rusage`` via ctypes, microseconds instead of the
tens of milliseconds a subprocess costs) and on other systems it answers "unknown" (``None``)
without spawning anything. Linux memory numbers come from psutil.

Units: bytes internally; ``*_gb`` fields are decimal GB (1e9). Tier boundaries are physical
memory in GiB, because a "16 GB" Mac has 16 GiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from metal_guard import backend

log = logging.getLogger("metal_guard.hardware")

#: ``runner(argv, timeout_sec) -> stdout`` or ``None`` when the command is missing or failed.
CommandRunner = Callable[[Sequence[str], float], "str | None"]

GIB = 1 << 30
GB = 1_000_000_000
WIRED_LIMIT_ADVISORY_RATIO = 0.85
_GPU_FAMILIES = {13: "M1", 14: "M2", 15: "M3", 16: "M4", 17: "M5"}
_VARIANTS = {"p": "phone", "g": "base/pro", "s": "pro/max", "d": "ultra"}
PRESSURE_NAMES = {1: "normal", 2: "warn", 4: "critical"}


def run_command(argv: Sequence[str], timeout: float = 3.0) -> str | None:
    """Default runner: stdout of ``argv``, or ``None`` if it is missing, fails or times out."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("%s failed: %s", argv[0], exc)
        return None
    if proc.returncode != 0:
        log.debug("%s exited %s: %s", " ".join(argv), proc.returncode, proc.stderr.strip()[:200])
        return None
    return proc.stdout


def _is_darwin() -> bool:
    return sys.platform == "darwin"


# --------------------------------------------------------------------------- sysctl


_OID_LINE = re.compile(r"^([a-z_]+(?:\.[a-z0-9_]+)+)(?::| =)\s*(.*)$")


def parse_sysctl(text: str | None, name: str | None = None) -> str | None:
    """Value from ``sysctl name`` (``name: value``) or ``sysctl -n name`` output."""
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or "unknown oid" in line:
            continue
        match = _OID_LINE.match(line)
        if match is None:
            return line  # ``sysctl -n`` form
        if name is None or match.group(1) == name:
            return match.group(2).strip()
    return None


@functools.lru_cache(maxsize=1)
def _libc() -> Any | None:
    if not _is_darwin():
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.dylib", use_errno=True)
    except OSError:
        return None


def _sysctlbyname(name: str, *, string: bool) -> str | int | None:
    libc = _libc()
    if libc is None:
        return None
    size = ctypes.c_size_t(0)
    if libc.sysctlbyname(name.encode(), None, ctypes.byref(size), None, 0) != 0:
        return None
    buf = ctypes.create_string_buffer(max(size.value, 8))
    if libc.sysctlbyname(name.encode(), buf, ctypes.byref(size), None, 0) != 0:
        return None
    if string:
        return buf.value.decode("utf-8", "replace")
    return int.from_bytes(buf.raw[: size.value], sys.byteorder, signed=size.value == 4)


#: sysctls read in-process on macOS (name -> is a string); others go through ``sysctl -n``.
_FAST_SYSCTLS = {"hw.memsize": False, "kern.memorystatus_vm_pressure_level": False,
                 "iogpu.wired_limit_mb": False, "machdep.cpu.brand_string": True, "hw.model": True}


def read_sysctl(name: str, *, runner: CommandRunner | None = None) -> str | None:
    """``sysctl -n name`` as a string; ``None`` when unknown (not macOS, unknown oid, failure)."""
    if runner is None:
        if not _is_darwin():
            return None
        if name in _FAST_SYSCTLS:
            fast = _sysctlbyname(name, string=_FAST_SYSCTLS[name])
            if fast is not None:
                return str(fast)
        runner = run_command
    return parse_sysctl(runner(["sysctl", "-n", name], 3.0), name)


def _sysctl_int(name: str, runner: CommandRunner | None) -> int | None:
    value = read_sysctl(name, runner=runner)
    if value is not None and "->" in value:  # output of a set: ``old -> new``
        value = value.rsplit("->", 1)[1]
    try:
        return int(value.strip()) if value is not None else None
    except ValueError:
        return None


_SIZE_RE = re.compile(r"(total|used|free)\s*=\s*([\d.]+)\s*([KMGTP]?)", re.I)
_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_swapusage(text: str | None) -> dict[str, Any] | None:
    """``vm.swapusage: total = 1.50G  used = 512.00K  free = 1.50G  (encrypted)`` → bytes."""
    if not text:
        return None
    found = {m.group(1).lower(): int(float(m.group(2)) * _UNIT[m.group(3).upper()])
             for m in _SIZE_RE.finditer(text)}
    if "total" not in found:
        return None
    return {
        "total_bytes": found["total"],
        "used_bytes": found.get("used", 0),
        "free_bytes": found.get("free", found["total"] - found.get("used", 0)),
        "encrypted": "encrypted" in text,
    }


def parse_vm_stat(text: str | None) -> dict[str, int] | None:
    """``vm_stat`` output → ``{"page_size_bytes": n, "<field>_bytes": ...}``."""
    if not text:
        return None
    page = re.search(r"page size of (\d+) bytes", text)
    if not page:
        return None
    page_size = int(page.group(1))
    out = {"page_size_bytes": page_size}
    for match in re.finditer(r'^\s*"?([A-Za-z][A-Za-z \-]+?)"?:\s+(\d+)\.?\s*$', text, re.M):
        key = re.sub(r"[^a-z]+", "_", match.group(1).lower()).strip("_")
        key = key.replace("pages_", "", 1) if key.startswith("pages_") else key
        out[key + "_bytes"] = int(match.group(2)) * page_size
    return out


def memory_pressure_level(*, runner: CommandRunner | None = None) -> int | None:
    """macOS ``kern.memorystatus_vm_pressure_level``: 1 normal, 2 warn, 4 critical; else ``None``."""
    return _sysctl_int("kern.memorystatus_vm_pressure_level", runner)


# --------------------------------------------------------------------------- footprint

_RUSAGE_INFO_V4 = 4


_RUSAGE_V4_FIELDS = (
    "ri_user_time", "ri_system_time", "ri_pkg_idle_wkups", "ri_interrupt_wkups", "ri_pageins",
    "ri_wired_size", "ri_resident_size", "ri_phys_footprint", "ri_proc_start_abstime",
    "ri_proc_exit_abstime", "ri_child_user_time", "ri_child_system_time",
    "ri_child_pkg_idle_wkups", "ri_child_interrupt_wkups", "ri_child_pageins",
    "ri_child_elapsed_abstime", "ri_diskio_bytesread", "ri_diskio_byteswritten",
    "ri_cpu_time_qos_default", "ri_cpu_time_qos_maintenance", "ri_cpu_time_qos_background",
    "ri_cpu_time_qos_utility", "ri_cpu_time_qos_legacy", "ri_cpu_time_qos_user_initiated",
    "ri_cpu_time_qos_user_interactive", "ri_billed_system_time", "ri_serviced_system_time",
    "ri_logical_writes", "ri_lifetime_max_phys_footprint", "ri_instructions", "ri_cycles",
    "ri_billed_energy", "ri_serviced_energy", "ri_interval_max_phys_footprint",
    "ri_runnable_time",
)


class _RusageInfoV4(ctypes.Structure):
    """``struct rusage_info_v4`` from <sys/resource.h>: a 16-byte uuid then 35 uint64."""

    _fields_ = [("ri_uuid", ctypes.c_uint8 * 16)] + [
        (name, ctypes.c_uint64) for name in _RUSAGE_V4_FIELDS
    ]


@dataclass(frozen=True)
class Footprint:
    """A process's memory footprint. ``source`` says which number it is."""

    pid: int
    footprint_bytes: int
    lifetime_max_bytes: int | None
    source: str  # "ri_phys_footprint" (macOS, includes Metal buffers) or "psutil_rss"


@functools.lru_cache(maxsize=1)
def _libproc() -> Any | None:
    if not _is_darwin():
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("proc") or "/usr/lib/libproc.dylib")
        lib.proc_pid_rusage.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        lib.proc_pid_rusage.restype = ctypes.c_int
        return lib
    except (OSError, AttributeError):
        return None


def rusage_footprint(pid: int, lib: Any | None = None) -> Footprint | None:
    """``proc_pid_rusage(pid, RUSAGE_INFO_V4)`` → footprint, or ``None`` (not macOS, no such pid,
    not permitted). ``lib`` is injectable for tests; it defaults to libproc."""
    lib = lib if lib is not None else _libproc()
    if lib is None:
        return None
    info = _RusageInfoV4()
    try:
        rc = lib.proc_pid_rusage(int(pid), _RUSAGE_INFO_V4, ctypes.byref(info))
    except Exception as exc:
        log.debug("proc_pid_rusage(%s) failed: %s", pid, exc)
        return None
    if rc != 0:
        return None
    return Footprint(int(pid), int(info.ri_phys_footprint),
                     int(info.ri_lifetime_max_phys_footprint) or None, "ri_phys_footprint")


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
        total = _sysctl_int("hw.memsize", runner)
        vm = parse_vm_stat(runner(["vm_stat"], 3.0))
        if vm:  # what psutil calls available on macOS: free + inactive (+ speculative)
            available = sum(vm.get(k, 0) for k in ("free_bytes", "inactive_bytes", "speculative_bytes"))
        swap = parse_swapusage(read_sysctl("vm.swapusage", runner=runner))
        if swap:
            swap_total, swap_used = swap["total_bytes"], swap["used_bytes"]
    else:
        try:
            import psutil

            vmem = psutil.virtual_memory()
            total, available = int(vmem.total), int(vmem.available)
            sw = psutil.swap_memory()
            swap_total, swap_used = int(sw.total), int(sw.used)
        except Exception as exc:
            log.debug("psutil memory read failed: %s", exc)
    level = memory_pressure_level(runner=runner) if (runner is not None or _is_darwin()) else None
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
        total, total_source = _sysctl_int("hw.memsize", runner), "sysctl"
    if not total and runner is None:
        try:
            import psutil

            total, total_source = int(psutil.virtual_memory().total), "psutil"
        except Exception:
            total, total_source = None, "unknown"
    working_set = info.get("max_recommended_working_set_size") or info.get("total_memory")
    ws_source = "mlx_device_info" if working_set else "unknown"
    if not working_set and total and (runner is not None or _is_darwin()):
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
    limit_mb = _sysctl_int("iogpu.wired_limit_mb", runner)
    total = _sysctl_int("hw.memsize", runner)
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


_KEXT = "com.apple.iokit.IOGPUFamily"
_KEXT_RE = re.compile(re.escape(_KEXT) + r"\s*\(([\d.]+)\)")
_BUNDLE_RE = re.compile(r'"CFBundleVersion"\s*=\s*"([\d.]+)"')


def parse_kext_version(text: str | None) -> str | None:
    """IOGPUFamily version from ``kmutil showloaded`` / ``kextstat`` / panic-log text."""
    if not text:
        return None
    match = _KEXT_RE.search(text)
    if match:
        return match.group(1)
    match = _BUNDLE_RE.search(text)
    return match.group(1) if match else None


def read_gpu_driver_version(*, runner: CommandRunner | None = None, timeout: float = 3.0) -> str | None:
    """The IOGPUFamily kext version (mlx#3186 correlates panics with it), or ``None``.

    Tries ``kmutil showloaded``, then the deprecated ``kextstat``, then ``ioreg``. Without a runner
    it only runs on macOS and is cached for the life of the process.
    """
    if runner is None:
        if not _is_darwin():
            return None
        return _cached_driver_version(timeout)
    return _driver_version(runner, timeout)


@functools.lru_cache(maxsize=1)
def _cached_driver_version(timeout: float) -> str | None:
    return _driver_version(run_command, timeout)


def _driver_version(runner: CommandRunner, timeout: float) -> str | None:
    for argv in (
        ["kmutil", "showloaded", "--list-only", "--bundle-identifier", _KEXT],
        ["kextstat", "-l", "-b", _KEXT],
        ["ioreg", "-rc", "IOGPUFamily", "-d", "1"],
    ):
        version = parse_kext_version(runner(argv, timeout))
        if version:
            return version
    return None


def parse_ioreg_performance_statistics(text: str | None) -> dict[str, int] | None:
    """The integer fields of an ``ioreg -r -c IOAccelerator`` ``PerformanceStatistics`` dict."""
    if not text:
        return None
    block = re.search(r'"PerformanceStatistics"\s*=\s*\{(.*?)\}', text, re.S)
    if not block:
        return None
    return {m.group(1): int(m.group(2)) for m in re.finditer(r'"([^"]+)"\s*=\s*(\d+)', block.group(1))}


def gpu_accelerator_stats(*, runner: CommandRunner | None = None) -> dict[str, int] | None:
    """GPU-wide ``In use system memory`` / ``Alloc system memory`` / ``recoveryCount`` (macOS)."""
    if runner is None:
        if not _is_darwin():
            return None
        runner = run_command
    return parse_ioreg_performance_statistics(runner(["ioreg", "-r", "-d", "1", "-c", "IOAccelerator"], 5.0))


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
