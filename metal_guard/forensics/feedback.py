"""R8: format a GPU kernel panic as a report ready to paste into Apple's Feedback Assistant.

:func:`format_panic_for_apple_feedback` does no I/O: give it a :class:`PanicRecord` (or its
``to_dict()``), optionally the breadcrumb tail and the ``system.json`` of a postmortem, and it
returns Markdown. Home-directory user names are redacted by default.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from metal_guard.forensics.records import PanicRecord

__all__ = ["format_panic_for_apple_feedback"]

_HOME_RE = re.compile(r"(/Users/|/home/)[^/\s\"']+")
_LINE_RE = re.compile(r'"?([^"\n]{0,200}?)"?\s*@\s?(IOGPU\w*\.cpp:\d+)')
_OS_BUILD_RE = re.compile(r"^OS version:\s*(\S+)", re.MULTILINE)
_KERNEL_RE = re.compile(r"^Kernel version:\s*(.+)$", re.MULTILINE)


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}text\n{text.rstrip()}\n{ticks}"


def _redact(text: str, enabled: bool) -> str:
    return _HOME_RE.sub(r"\1<user>", text) if enabled else text


def _record(forensics: PanicRecord | Mapping[str, Any]) -> PanicRecord:
    if isinstance(forensics, PanicRecord):
        return forensics
    if isinstance(forensics, Mapping):
        data = dict(forensics)
        if isinstance(data.get("panics"), list) and data["panics"]:
            data = dict(data["panics"][0])
        if "timestamp" not in data and "ts" not in data:
            data["timestamp"] = 0.0
        record = PanicRecord.from_dict(data)
        text = data.get("panic_string") or data.get("panicString") or data.get("excerpt")
        if isinstance(text, str) and text != record.excerpt:
            record = dataclasses.replace(record, excerpt=text[:20000])
        extra = data.get("extra")
        if isinstance(extra, Mapping):
            record.extra.update(extra)
        return record
    raise TypeError(f"expected a PanicRecord or a mapping, got {type(forensics).__name__}")


#: Keys of the 0.11 ``forensics`` mapping besides the panic text (``panic_string``).
LEGACY_KEYS = ("panic_time", "hardware", "gpu_driver", "os_version", "kernel_version",
               "mlx_versions", "repro_steps", "breadcrumbs", "advisories")


def _legacy(forensics: Any) -> dict[str, Any]:
    """The 0.11 ``forensics`` keys present in a mapping (empty values dropped)."""
    if not isinstance(forensics, Mapping):
        return {}
    return {k: forensics[k] for k in LEGACY_KEYS if forensics.get(k) not in (None, "", [], {})}


def _hardware(value: Any) -> str | None:
    if isinstance(value, Mapping):
        chip = value.get("chip") or value.get("model") or "unknown chip"
        mem = value.get("gpu_memory_gb") or value.get("memory_gb")
        extra = f" ({mem} GB unified)" if mem not in (None, "") else ""
        return f"{chip}{extra}"
    return str(value) if value else None


def _steps(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, Mapping | bytes):
        return [str(v) for v in value]
    return [str(value)]


def _advisory_line(adv: Mapping[str, Any]) -> str:
    what = " ".join(str(adv[k]) for k in ("package", "installed_version") if adv.get(k))
    title = adv.get("title") or adv.get("id") or "advisory"
    where = adv.get("url") or adv.get("issue") or ""
    line = "- Advisory"
    if adv.get("severity"):
        line += f" [{adv['severity']}]"
    if what:
        line += f" {what}"
    return f"{line}: {title}" + (f" ({where})" if where else "")


def _classified(rec: PanicRecord) -> PanicRecord:
    """A 0.11 mapping carries only the panic text: classify it like a parsed report."""
    try:
        from metal_guard.classify import classify_mlx_error, detect_panic_signature

        cls = classify_mlx_error(rec.excerpt)
        signature, explanation = detect_panic_signature(rec.excerpt)
    except ImportError:
        return rec
    return dataclasses.replace(
        rec, error_class=cls.name if cls else None, signature=rec.signature or signature,
        explanation=rec.explanation or explanation or "")


def _upstream_refs(record: PanicRecord) -> list[str]:
    try:
        from metal_guard.classify import get_error_class

        if record.error_class:
            return list(get_error_class(record.error_class).upstream_refs)
    except (ImportError, KeyError):
        pass
    return []


def _ref_url(ref: str) -> str:
    repo, _, number = ref.partition("#")
    return f"https://github.com/{repo}/issues/{number}" if number else ref


def format_panic_for_apple_feedback(
    forensics: PanicRecord | Mapping[str, Any],
    *,
    include_breadcrumb: bool = True,
    max_breadcrumb_lines: int = 60,
    breadcrumb_tail: Sequence[str] | None = None,
    system: Mapping[str, Any] | None = None,
    reproducer: str | Iterable[str] | None = None,
    advisories: Iterable[Mapping[str, Any]] | None = None,
    redact_home: bool = True,
) -> str:
    """Markdown for Feedback Assistant: title, summary, panic string, system, steps to
    reproduce, what metal-guard observed, breadcrumb tail and related public reports.

    A mapping may also carry the 0.11 keys (:data:`LEGACY_KEYS`): ``panic_time``,
    ``hardware`` (``{"chip", "gpu_memory_gb"}``), ``gpu_driver``, ``os_version``,
    ``kernel_version``, ``mlx_versions`` (``{package: version}``), ``repro_steps``,
    ``breadcrumbs`` and ``advisories``; all of them are rendered. Keyword arguments win over
    the mapping's keys."""
    rec = _record(forensics)
    legacy = _legacy(forensics)
    if legacy and not rec.error_class and rec.excerpt:
        rec = _classified(rec)
    if reproducer is None and "repro_steps" in legacy:
        reproducer = _steps(legacy["repro_steps"])
    if breadcrumb_tail is None and "breadcrumbs" in legacy:
        breadcrumb_tail = _steps(legacy["breadcrumbs"])
    if advisories is None and isinstance(legacy.get("advisories"), list | tuple):
        advisories = [a for a in legacy["advisories"] if isinstance(a, Mapping)]
    text = rec.excerpt or rec.explanation or "(panic text unavailable)"
    m = _LINE_RE.search(text)
    what = f"{m.group(1).strip()} @{m.group(2)}" if m else (rec.signature or "kernel panic")
    when = datetime.fromtimestamp(rec.timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") \
        if rec.timestamp else str(legacy.get("panic_time") or "unknown time")
    sysinfo = dict(system or {})
    gpu_info = sysinfo.get("gpu")
    gpu: Mapping[str, Any] = gpu_info if isinstance(gpu_info, Mapping) else {}
    os_build = _OS_BUILD_RE.search(text)
    kernel = _KERNEL_RE.search(text)
    mlx_versions = legacy.get("mlx_versions")
    facts = [
        ("macOS", rec.extra.get("os_version") or legacy.get("os_version")
         or (os_build.group(1) if os_build else None)),
        ("Kernel", kernel.group(1).strip() if kernel else legacy.get("kernel_version")),
        ("Hardware model", rec.extra.get("product") or rec.extra.get("model_code")),
        ("Hardware", _hardware(legacy.get("hardware"))),
        ("GPU", " ".join(str(v) for v in (gpu.get("device_name"), gpu.get("family")) if v) or None),
        ("IOGPUFamily", rec.extra.get("iogpu_family_version") or legacy.get("gpu_driver")),
        ("MLX", sysinfo.get("mlx_version")),
        ("Panicked process", f"{rec.process} (pid {rec.pid})" if rec.process else None),
    ]
    if isinstance(mlx_versions, Mapping):
        facts += [(str(pkg), ver) for pkg, ver in sorted(mlx_versions.items(), key=lambda kv: str(kv[0]))]
    lines = [
        f"# Kernel panic in IOGPUFamily: {what}", "",
        "**Area:** macOS → Graphics & Metal (GPU driver)  ",
        "**Type:** Crash / kernel panic  ",
        f"**When:** {when}", "",
        "## Summary", "",
        f"The Mac kernel-panicked and rebooted while a user-space Metal compute workload was "
        f"running. The panic is raised inside IOGPUFamily ({what}), i.e. the driver's own "
        "bookkeeping failed; a user process should at most be terminated, not bring down the "
        "machine.", "",
        "## Panic string", "", _fence(_redact(text, redact_home)), "",
        "## System", "",
    ]
    lines += [f"- **{k}:** {_redact(str(v), redact_home)}" for k, v in facts if v] or ["- (not collected)"]
    lines += ["", "## Steps to reproduce", ""]
    if reproducer is None:
        lines += ["1. Run an MLX (Metal) inference workload — e.g. load a model, generate, unload, "
                  "and load another model — on this machine.",
                  "2. Repeat model loads/unloads or long generations until the machine panics.",
                  "3. <describe the model, context length and timing here>"]
    else:
        steps = [reproducer] if isinstance(reproducer, str) else list(reproducer)
        lines += [f"{i}. {_redact(str(s), redact_home)}" for i, s in enumerate(steps, 1)]
    lines += ["", "**Expected:** the GPU work fails or the process is terminated.  ",
              "**Actual:** kernel panic and reboot.", "",
              "## What metal-guard observed", "",
              f"- Classifier: `{rec.error_class or 'unclassified'}` (signature "
              f"`{rec.signature or 'none'}`)",
              f"- Explanation: {rec.explanation or 'n/a'}"]
    if rec.path:
        lines.append(f"- Report: `{_redact(rec.path, redact_home)}` (time from {rec.timestamp_source})")
    gate = sysinfo.get("gate") if isinstance(sysinfo.get("gate"), Mapping) else None
    if gate:
        lines.append(f"- GPU kernel panics in 24 h / 72 h: {gate.get('recent_panics_24h')} / "
                     f"{gate.get('recent_panics_72h')}")
    lines += [_advisory_line(adv) for adv in advisories or []]
    if include_breadcrumb and breadcrumb_tail:
        tail = list(breadcrumb_tail)[-max(0, int(max_breadcrumb_lines)):]
        if tail:
            lines += ["", f"## Application breadcrumbs before the panic (last {len(tail)} lines)", "",
                      _fence(_redact("\n".join(tail), redact_home))]
    refs = _upstream_refs(rec)
    if refs:
        lines += ["", "## Related public reports", ""]
        lines += [f"- {ref}: {_ref_url(ref)}" for ref in refs]
    return "\n".join(lines) + "\n"
