"""``metal-guard doctor``: what is installed, where state lives, what is enabled.

Doctor never initialises the GPU: versions come from package metadata and the backend is
named from what the ``mlx`` install provides, so it is safe to run during a panic cooldown.
Sections contributed by other layers are collected through :data:`SECTIONS`; a section that
fails is reported as an error instead of breaking the command.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from importlib import metadata
from typing import Any

from metal_guard._version import __version__
from metal_guard.cli import EXIT_OK, add_command, emit

PACKAGES = ("mlx", "mlx-lm", "mlx-vlm", "transformers", "langchain-core", "langchain-community",
            "wrapt", "psutil", "filelock", "platformdirs", "packaging")

#: Extra sections: name -> "module:function" returning a JSON-able dict.
SECTIONS: dict[str, str] = {
    "state": "metal_guard.cli.state:doctor_section",
    "knowledge": "metal_guard.knowledge.advisories:doctor_section",
    "integration": "metal_guard.autoload:doctor_section",
}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _expected_backend() -> str:
    """The backend the installed MLX provides, without importing it."""
    from metal_guard import backend

    if backend.loaded_core() is not None:
        return backend.backend_name(load=False)
    if _version("mlx") is None:
        return "none"
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "metal"
    if _version("mlx-cuda") is not None:
        return "cuda"
    return "cpu"


def _hardware() -> dict[str, Any]:
    import psutil

    vm = psutil.virtual_memory()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": psutil.cpu_count(),
        "memory_total_bytes": int(vm.total),
        "memory_available_bytes": int(vm.available),
    }


def collect() -> dict[str, Any]:
    from metal_guard.settings import get_settings

    settings = get_settings()
    report: dict[str, Any] = {
        "metal_guard": __version__,
        "backend": _expected_backend(),
        "versions": {name: _version(name) for name in PACKAGES},
        "hardware": _hardware(),
        "paths": {
            "state_dir": str(settings.state_dir),
            "cache_dir": str(settings.cache_dir),
            "lock": str(settings.resolved_lock_path),
            "breadcrumbs": str(settings.resolved_breadcrumb_path),
            "status": str(settings.resolved_status_path),
            "diagnostic_reports": [str(p) for p in settings.report_dirs],
        },
        "settings": {
            "mode": settings.mode,
            "disabled": settings.disabled,
            "autoload": settings.autoload,
            "panic_gate_disabled": settings.panic_gate_disabled,
            "from_env": sorted(settings.from_env),
        },
        "errors": {},
    }
    for name, target in SECTIONS.items():
        module_name, _, func_name = target.partition(":")
        try:
            report[name] = getattr(importlib.import_module(module_name), func_name)()
        except Exception as exc:
            report["errors"][name] = f"{type(exc).__name__}: {exc}"[:300]
    return report


def render(report: dict[str, Any]) -> str:
    lines = [f"metal-guard {report['metal_guard']}  backend={report['backend']}"]
    lines.append("versions:")
    for name, ver in report["versions"].items():
        lines.append(f"  {name:<20} {ver or '-'}")
    hw = report["hardware"]
    lines.append(
        f"hardware: {hw['machine']} {hw['platform']}, {hw['cpu_count']} CPUs, "
        f"{hw['memory_total_bytes'] / 1e9:.1f} GB RAM ({hw['memory_available_bytes'] / 1e9:.1f} GB available)"
    )
    lines.append("paths:")
    for key, value in report["paths"].items():
        if isinstance(value, list):
            value = ", ".join(value)
        lines.append(f"  {key:<20} {value}")
    s = report["settings"]
    lines.append(
        f"settings: mode={s['mode']} disabled={s['disabled']} autoload={s['autoload']} "
        f"panic_gate_disabled={s['panic_gate_disabled']}"
    )
    if s["from_env"]:
        lines.append(f"  from environment: {', '.join(s['from_env'])}")
    for name in SECTIONS:
        if name in report:
            lines.append(f"{name}:")
            for key, value in report[name].items():
                lines.append(f"  {key:<20} {value}")
    for name, err in report["errors"].items():
        lines.append(f"{name}: unavailable ({err})")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    report = collect()
    emit(args, report, render(report))
    return EXIT_OK


def register(subparsers: Any) -> None:
    parser = add_command(subparsers, "doctor", help="show versions, backend, hardware, state paths and what is enabled")
    parser.set_defaults(func=_run)
