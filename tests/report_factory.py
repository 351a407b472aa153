"""Build realistic macOS panic / crash reports at a chosen time (shared by the forensics tests).

The layout follows ``tests/fixtures/reports`` (see ``make_fixtures.py`` there): a one-line JSON
header with ``bug_type`` and ``timestamp``, then a pretty-printed JSON body.
"""

from __future__ import annotations

import json
import shutil
import uuid
from datetime import datetime
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reports"

UNDERFLOW_550 = '"completeMemory() prepare count underflow" @IOGPUMemory.cpp:550'
UNDERFLOW_492 = '"completeMemory() prepare count underflow" @IOGPUMemory.cpp:492'
PENDING_219 = '"Memory object unexpectedly not found in fPendingMemorySet" @IOGPUGroupMemory.cpp:219'
REMOVE_323 = '"IOGPUGroupMemory::remove_memory_object() memory object not found" @IOGPUGroupMemory.cpp:323'
WATCHDOG = "watchdog timeout: no checkins from watchdogd in 92 seconds (5 total checkins since wake)"


def apple_date(ts: float) -> str:
    """``2026-08-20 06:58:41.00 -0700`` style, in local time with its offset."""
    local = datetime.fromtimestamp(ts).astimezone()
    return local.strftime("%Y-%m-%d %H:%M:%S.00 %z")


def name_stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d-%H%M%S")


def panic_string(line: str, *, pid: int = 50218, proc: str = "Python") -> str:
    return (
        f"panic(cpu 7 caller 0xfffffe004418be28): {line}\n"
        "Debugger message: panic\nOS version: 25E246\n"
        "Kernel version: Darwin Kernel Version 25.4.0: Thu Mar 19 19:31:09 PDT 2026; "
        "root:xnu-12377.101.15~1/RELEASE_ARM64_T8132\n"
        "Paniclog version: 15\n"
        f"Panicked task 0xfffffe1e4174a418: 367197 pages, 25 threads: pid {pid}: {proc}\n"
        "      Kernel Extensions in backtrace:\n"
        "         com.apple.iokit.IOGPUFamily(130.13)[1CC2AF3D-E6EF-3DC2-B32B-8DBD8CAA09B7]"
        "@0xfffffe0044180000->0xfffffe00441c7fff\n"
        "loaded kexts:\ncom.apple.iokit.IOGPUFamily\t130.13\n"
    )


def panic_report(when: float, line: str = UNDERFLOW_550, *, incident: str | None = None,
                 key: str = "panicString", padding: int = 0) -> str:
    header = {"bug_type": "210", "timestamp": apple_date(when), "os_version": "macOS 26.4 (25E246)",
              "roots_installed": 0, "incident_id": incident or str(uuid.uuid4()).upper()}
    body = {"build": "macOS 26.4 (25E246)", "product": "Mac16,10", "incident": header["incident_id"],
            "date": apple_date(when), key: panic_string(line), "panicFlags": "0x902"}
    if padding:
        body["processByPid"] = {"0": {"procname": "kernel_task", "pad": "x" * padding}}
    return json.dumps(header, separators=(",", ":")) + "\n" + json.dumps(body, indent=2) + "\n"


def write_panic(directory: Path, when: float, line: str = UNDERFLOW_550, *,
                written_after_sec: float = 600.0, **kwargs: object) -> Path:
    """A ``panic-full-<written>.0002.panic`` whose name is dated when it was written (after the
    reboot) and whose header carries the panic time ``when``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"panic-full-{name_stamp(when + written_after_sec)}.0002.panic"
    n = 1
    while path.exists():
        path = directory / f"panic-full-{name_stamp(when + written_after_sec)}.{n:04d}.panic"
        n += 1
    path.write_text(panic_report(when, line, **kwargs), encoding="utf-8")  # type: ignore[arg-type]
    return path


def write_metal_abort(directory: Path, when: float, *, app: str = "Python") -> Path:
    """A ``bug_type`` 309 SIGABRT on ``com.Metal.CompletionQueueDispatch``."""
    header = {"app_name": app, "timestamp": apple_date(when), "bug_type": "309",
              "os_version": "macOS 26.3.1 (25D2128)", "incident_id": str(uuid.uuid4()).upper(),
              "name": app}
    body = {
        "pid": 4242, "procName": app, "captureTime": apple_date(when),
        "exception": {"type": "EXC_CRASH", "signal": "SIGABRT",
                      "codes": "0x0000000000000000, 0x0000000000000000"},
        "termination": {"namespace": "SIGNAL", "code": 6, "indicator": "Abort trap: 6"},
        "asi": {"libsystem_c.dylib": ["abort() called"]},
        "faultingThread": 0,
        "threads": [{"triggered": True, "queue": "com.Metal.CompletionQueueDispatch",
                     "frames": [{"imageIndex": 0, "symbol": "__pthread_kill"},
                                {"imageIndex": 1, "symbol": "mlx::core::gpu::check_error(MTL::CommandBuffer*)"}]}],
        "usedImages": [{"name": "libsystem_kernel.dylib"}, {"name": "libmlx.dylib"}],
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{app}-{name_stamp(when)}.ips"
    path.write_text(json.dumps(header, separators=(",", ":")) + "\n" + json.dumps(body, indent=2))
    return path


def copy_fixtures(target: Path) -> Path:
    """Copy the committed report fixtures (not the generator script) into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for src in FIXTURES.iterdir():
        if src.suffix in (".panic", ".ips", ".crash", ".txt"):
            shutil.copy2(src, target / src.name)
    return target
