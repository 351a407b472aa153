"""The macOS readers: sysctl, ``vm_stat``, swap, memory pressure, process footprint, the GPU kext.

Readers that shell out (``sysctl``, ``vm_stat``, ``kmutil``/``kextstat``, ``ioreg``) take an
injectable ``runner`` — ``runner(argv, timeout) -> stdout | None`` — so the parsers are tested on
captured real outputs on any OS. With no runner, a reader on macOS uses a fast in-process path
where one exists (``sysctlbyname``, ``proc_pid_rusage`` via ctypes, microseconds instead of the
tens of milliseconds a subprocess costs) and on other systems it answers "unknown" (``None``)
without spawning anything. The portable API built on these is :mod:`metal_guard.hardware`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("metal_guard.macos")

__all__ = [
    "PRESSURE_NAMES",
    "CommandRunner",
    "Footprint",
    "gpu_accelerator_stats",
    "is_darwin",
    "memory_from_commands",
    "memory_pressure_level",
    "parse_ioreg_performance_statistics",
    "parse_kext_version",
    "parse_swapusage",
    "parse_sysctl",
    "parse_vm_stat",
    "read_iogpu_kext_version",
    "read_sysctl",
    "read_sysctl_int",
    "run_command",
    "rusage_footprint",
]

#: ``runner(argv, timeout_sec) -> stdout`` or ``None`` when the command is missing or failed.
CommandRunner = Callable[[Sequence[str], float], "str | None"]

#: ``kern.memorystatus_vm_pressure_level`` values.
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


def is_darwin() -> bool:
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
    if not is_darwin():
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
        if not is_darwin():
            return None
        if name in _FAST_SYSCTLS:
            fast = _sysctlbyname(name, string=_FAST_SYSCTLS[name])
            if fast is not None:
                return str(fast)
        runner = run_command
    return parse_sysctl(runner(["sysctl", "-n", name], 3.0), name)


def read_sysctl_int(name: str, runner: CommandRunner | None = None) -> int | None:
    """:func:`read_sysctl` as an integer (the new value of an ``old -> new`` set); else ``None``."""
    value = read_sysctl(name, runner=runner)
    if value is not None and "->" in value:  # output of a set: ``old -> new``
        value = value.rsplit("->", 1)[1]
    try:
        return int(value.strip()) if value is not None else None
    except ValueError:
        return None


# --------------------------------------------------------------------------- memory


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
    return read_sysctl_int("kern.memorystatus_vm_pressure_level", runner)


def memory_from_commands(runner: CommandRunner) -> tuple[int | None, int | None, int | None, int | None]:
    """``(total, available, swap_total, swap_used)`` bytes from ``hw.memsize``, ``vm_stat`` and
    ``vm.swapusage`` run through ``runner``; an unreadable value is ``None``."""
    total = read_sysctl_int("hw.memsize", runner)
    available = swap_total = swap_used = None
    vm = parse_vm_stat(runner(["vm_stat"], 3.0))
    if vm:  # what psutil calls available on macOS: free + inactive (+ speculative)
        available = sum(vm.get(k, 0) for k in ("free_bytes", "inactive_bytes", "speculative_bytes"))
    swap = parse_swapusage(read_sysctl("vm.swapusage", runner=runner))
    if swap:
        swap_total, swap_used = swap["total_bytes"], swap["used_bytes"]
    return total, available, swap_total, swap_used


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
    if not is_darwin():
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


# --------------------------------------------------------------------------- GPU kext / ioreg


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


def read_iogpu_kext_version(*, runner: CommandRunner | None = None, timeout: float = 3.0) -> str | None:
    """The IOGPUFamily kext version: ``kmutil showloaded``, then ``kextstat``, then ``ioreg``.

    Without a runner it only runs on macOS and is cached for the life of the process.
    """
    if runner is None:
        if not is_darwin():
            return None
        return _cached_kext_version(timeout)
    return _kext_version(runner, timeout)


@functools.lru_cache(maxsize=1)
def _cached_kext_version(timeout: float) -> str | None:
    return _kext_version(run_command, timeout)


def _kext_version(runner: CommandRunner, timeout: float) -> str | None:
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
        if not is_darwin():
            return None
        runner = run_command
    return parse_ioreg_performance_statistics(runner(["ioreg", "-r", "-d", "1", "-c", "IOAccelerator"], 5.0))
