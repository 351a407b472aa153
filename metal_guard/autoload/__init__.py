"""Zero-code activation: the boot module, its start-up files and what they report.

* ``startup/_metal_guard_boot.py`` — the boot module. The wheel installs it at the top of
  site-packages together with ``metal_guard-autoload.pth`` (Python <= 3.14) and
  ``metal_guard-autoload.start`` (PEP 829, Python >= 3.15). It does nothing unless
  ``METALGUARD_AUTOLOAD=1``; see its docstring and ``docs/integration.md``.
* ``startup/sitecustomize.py`` — the fallback used by ``metal-guard run`` where the ``.pth`` is
  missing (editable installs, installers that drop root files): put first on ``PYTHONPATH``,
  it activates the same way and runs any ``sitecustomize`` it shadows.

Importing this package imports nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["autoload_info", "doctor_section", "pth_installed", "shim_dir"]


def shim_dir() -> Path:
    """The directory holding ``_metal_guard_boot.py`` and the ``sitecustomize`` shim."""
    return Path(__file__).resolve().parent / "startup"


def _boot_origin() -> Path | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec("_metal_guard_boot")
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def pth_installed() -> bool:
    """True when this environment has the autoload ``.pth`` next to an importable boot module."""
    origin = _boot_origin()
    if origin is None:
        return False
    folder = origin.parent
    return folder != shim_dir() and (folder / "metal_guard-autoload.pth").is_file()


def autoload_info() -> dict[str, Any]:
    """Is zero-code activation available here, requested, and did it run in this process?"""
    import sys

    from metal_guard.settings import get_settings

    boot = sys.modules.get("_metal_guard_boot")
    origin = _boot_origin()
    return {
        "pth_installed": pth_installed(),
        "boot_module": str(origin) if origin else None,
        "requested": get_settings().autoload,
        "boot_ran": bool(getattr(boot, "_started", False)),
        "hidden_site_packages": bool(origin and any(p.startswith(".") for p in origin.parent.parts[1:])),
    }


def doctor_section() -> dict[str, Any]:
    """The integration section of ``metal-guard doctor``."""
    from metal_guard.installer import adapter_report

    report = adapter_report()
    return {
        "installed": report["installed"],
        "adapters": {name: a["state"] for name, a in report["adapters"].items()},
        "autoload": autoload_info(),
    }
