"""What ``install()`` reports: the adapter states, each adapter's row, and its version check.

:class:`InstallReport` (returned by ``install()`` and ``adapter_report()``) holds one
:class:`AdapterStatus` per registered adapter. Adapters declare the library versions they were
written for, as OpenTelemetry instrumentors declare ``instrumentation_dependencies()``: a module
constant ``INSTRUMENTS = ("mlx-lm>=0.32,<0.33",)`` (PEP 508 strings). Outside that range the
adapter still guards whatever targets exist — never worse than unguarded — but its state is
``degraded`` with the reason ``untested mlx-lm X (written for ...)`` and one warning says so.
:func:`distribution_version` is the one place installed versions are read; tests replace it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from metal_guard._results import ResultRecord

__all__ = [
    "AdapterState", "AdapterStatus", "InstallReport", "announce_line", "check_requirements",
    "distribution_version",
]


class AdapterState(StrEnum):
    """Where an adapter stands (a ``str``: ``state == "patched"`` works)."""

    #: installed, waiting for the library to be imported
    PENDING = "pending"
    #: every target of the imported modules is wrapped, on a library version it was written for
    PATCHED = "patched"
    #: guarded as far as possible, and says why not fully: some targets were not found, or the
    #: library's version is outside the range the adapter declares (``untested mlx-lm X``)
    DEGRADED = "degraded"
    #: the adapter module could not be imported: nothing of this library is guarded
    FAILED = "failed"
    #: not selected, or metal-guard not installed
    DISABLED = "disabled"


@dataclass(frozen=True, eq=False)
class AdapterStatus(ResultRecord):
    """One adapter's row of the :class:`InstallReport`."""

    name: str
    state: AdapterState
    reason: str = ""
    summary: str = ""
    #: the wrapped targets (``module:path``)
    sites: list[str] = field(default_factory=list)
    #: targets not found (the library changed)
    missing: list[str] = field(default_factory=list)
    #: re-exports rebound to the wrapper (``module:name``)
    aliases: list[str] = field(default_factory=list)
    #: target modules imported so far
    imported: list[str] = field(default_factory=list)
    #: what this adapter knowingly does not guard
    limitations: list[str] = field(default_factory=list)
    #: the version ranges the adapter was written for (PEP 508, e.g. ``mlx-lm>=0.32,<0.33``)
    requires: list[str] = field(default_factory=list)
    #: installed versions of those distributions (``None``: not installed / no metadata), once
    #: the library was imported
    versions: dict[str, str | None] = field(default_factory=dict)
    #: the distributions outside their range (``untested mlx-lm 0.40.0 ...``)
    untested: list[str] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class InstallReport(ResultRecord):
    """What :func:`install` did: returned by ``install()`` and :func:`adapter_report`."""

    installed: bool
    generation: int | None
    source: str | None
    #: the options ``install()`` was given (the guard options and its own keywords)
    options: dict[str, Any]
    #: the module names whose import is being watched
    watching: list[str]
    #: why nothing was installed (the kill switch), else empty
    note: str
    adapters: dict[str, AdapterStatus]


def distribution_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (``None``: not installed, or no metadata).

    The one place the installer asks ``importlib.metadata``; tests replace this function
    (``monkeypatch.setattr(installer, "distribution_version", ...)``) to play another version.
    """
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_requirements(requires: Iterable[str]) -> tuple[dict[str, str | None], list[str]]:
    """``({distribution: installed version}, [why each one is untested])`` for an adapter's
    declared ranges (PEP 508 strings, ``"mlx-lm>=0.32,<0.33"``). A version outside its range,
    or one that cannot be read, is "untested"; pre-releases are compared like releases."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import InvalidVersion, Version

    versions: dict[str, str | None] = {}
    untested: list[str] = []
    for text in requires:
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:  # an adapter bug: say so, never crash the import
            untested.append(f"invalid version range {text!r} ({exc})")
            continue
        found = distribution_version(req.name)
        versions[req.name] = found
        if found is None:
            untested.append(f"untested {req.name}: its version cannot be read "
                            f"(written for {req.name}{req.specifier})")
            continue
        try:
            ok = req.specifier.contains(Version(found), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            untested.append(f"untested {req.name} {found} (written for {req.name}{req.specifier})")
    return versions, untested


def announce_line(name: str, report: InstallReport, pid: int | None = None) -> str:
    """The one line ``METALGUARD_ANNOUNCE=1`` writes when adapter ``name`` is the first to patch."""
    from metal_guard._version import __version__

    entry = report.adapters[name]
    armed = [n for n, a in report.adapters.items()
             if n != name and a.state not in (AdapterState.DISABLED, AdapterState.FAILED)]
    state = "" if entry.state == AdapterState.PATCHED else f" ({entry.state}: {entry.reason})"
    line = (f"metal-guard {__version__} (pid {os.getpid() if pid is None else pid}): guarding "
            f"{name}{state} - {entry.summary}")
    if armed:
        line += "; also armed: " + ", ".join(armed)
    return line + " [silence: metal-guard run -q / METALGUARD_ANNOUNCE=0]"
