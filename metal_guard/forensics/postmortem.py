"""L12: collect a postmortem bundle after a panic and reboot.

``run_postmortem(DIR)`` (``metal-guard postmortem DIR``) writes into ``DIR`` — created 0700, or
an existing directory of ours that is empty or an earlier bundle and holds no symlink (see
:class:`~metal_guard.forensics.safefs.BundleDir`); every file is written through the
directory's fd, so a link planted inside is replaced, never followed:

* ``panics/`` — up to 5 GPU kernel-panic reports of the last 24 h, each capped at 5 MiB
  (a trailer marks a cut). Each is opened beneath its reports directory's fd with no symlink
  followed at any component; the opened file must be the one the scan listed (device and
  inode) and its bytes must parse again as the same GPU report, so a racing rename of a
  parent directory cannot copy any other file into the bundle;
* ``aborts/`` — up to 5 GPU/Metal process-crash reports of the last 24 h, same caps;
* ``breadcrumb_tail.log`` (last 500 lines), ``panics.jsonl`` (the breaker's archive, capped);
* ``system.json`` — gate verdict, platform, MLX version from package metadata and memory as
  published by guarded processes. MLX is **not imported while a cooldown is active** (or the
  gate is broken); otherwise only if some module already imported it;
* ``apple_feedback.md`` — the newest GPU panic formatted for Feedback Assistant (R8);
* ``index.md`` — summary and next steps.

When a GPU panic is found, a cooldown sentinel is written for ``METALGUARD_POSTMORTEM_SENTINEL_H``
hours from now, so the gate holds even if macOS rotates the reports away.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metal_guard.clock import utc_iso as _iso
from metal_guard.forensics.records import PanicRecord
from metal_guard.forensics.safefs import BundleDir, UnsafePathError
from metal_guard.storage import read_bytes_capped

if TYPE_CHECKING:
    from metal_guard.forensics.listing import Candidate, RootFds

log = logging.getLogger("metal_guard.forensics.postmortem")

__all__ = ["run_postmortem"]

MAX_REPORTS = 5
MAX_REPORT_BYTES = 5 * 1024 * 1024
BREADCRUMB_LINES = 500
MAX_ARCHIVE_BYTES = 5 * 1024 * 1024


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:200].lstrip(".")
    return cleaned or "report"


def _copy_report(record: PanicRecord, cand: Candidate | None, roots: RootFds, bundle: BundleDir,
                 sub: str, max_bytes: int) -> dict[str, Any]:
    """Copy the report the scan classified (and only that file) into ``bundle/sub``."""
    from metal_guard.forensics.reports import MAX_READ_BYTES, parse_report_bytes, read_report_bytes

    if cand is None:
        raise UnsafePathError(f"{record.path}: no scanned source to copy from")
    data, size, mtime = read_report_bytes(record.path, max_bytes, beneath=(roots.fd(cand), cand.rel),
                                          expect=cand.file_id)
    again = parse_report_bytes(data[:MAX_READ_BYTES], name=cand.name, path=record.path,
                               mtime=mtime, file_size=size)
    if again is None or not again.is_gpu or again.identity != record.identity:
        raise UnsafePathError(f"{record.path} changed after it was classified; not copied")
    if size > len(data):
        data += (f"\n\n[metal-guard: truncated at {len(data)} of {size} bytes; the original is "
                 f"{record.path}]\n").encode("utf-8", "backslashreplace")
    target = bundle.write_bytes(f"{sub}/{_safe_name(os.path.basename(record.path))}", data)
    return {"source": record.path, "copy": str(target), "bytes": size,
            "truncated": size > max_bytes, "signature": record.signature,
            "error_class": record.error_class, "time": record.when.isoformat()}


def _system_info(verdict: Any, settings: Any, *, panics_found: bool) -> dict[str, Any]:
    from metal_guard import backend

    # Importing MLX initialises Metal: never during a cooldown, when the gate cannot tell, or
    # when this very bundle found a GPU panic. Fresh counters of this process would be zeros
    # anyway, so only the device description is worth an import.
    may_load = verdict.exit_code == 0 and not panics_found
    info: dict[str, Any] = {
        "platform": platform.platform(), "machine": platform.machine(),
        "python": platform.python_version(), "mlx_version": backend.mlx_version(),
        "mlx_already_imported": backend.loaded_core() is not None,
        "mlx_import_policy": "allowed (no cooldown)" if may_load
        else "refused (cooldown active, gate broken or panic found)",
    }
    counters = backend.memory_counters(load=False)
    info["mlx_counters"] = None if counters is None else {
        "active_bytes": counters.active_bytes, "peak_bytes": counters.peak_bytes,
        "cache_bytes": counters.cache_bytes, "limit_bytes": counters.limit_bytes,
        "backend": counters.backend}
    device = backend.device_info(load=may_load and backend.is_available())
    info["device_info"] = device
    try:
        from metal_guard import hardware

        info["gpu"] = hardware.apple_gpu_family(device) if device else None
    except Exception as exc:
        info["gpu_error"] = f"{type(exc).__name__}: {exc}"
    try:
        from metal_guard.status import read_published_memory

        info["published_memory"] = read_published_memory(settings=settings)
    except Exception as exc:
        info["published_memory_error"] = f"{type(exc).__name__}: {exc}"
    return info


def _index(result: dict[str, Any], verdict: Any, copied: list[dict[str, Any]],
           aborts: list[dict[str, Any]], now_ts: float) -> str:
    lines = [f"# metal-guard postmortem — {_iso(now_ts)}", "",
             f"- Gate verdict: **{verdict.state.upper()}** (exit {verdict.exit_code}) — {verdict.reason}",
             f"- GPU kernel panics in the last 24 h: {len(copied)} copied"
             f" (72 h total: {verdict.recent_panics_72h})",
             f"- GPU process aborts in the last 24 h: {len(aborts)} copied", ""]
    if copied:
        lines += ["## GPU kernel panics", "", "| time (UTC) | signature | report |", "|---|---|---|"]
        lines += [f"| {c['time']} | {c['signature'] or '?'} | `{os.path.basename(c['copy'])}`"
                  f"{' (truncated)' if c['truncated'] else ''} |" for c in copied]
        lines.append("")
    if aborts:
        lines += ["## GPU process aborts", ""]
        lines += [f"- {c['time']} {c['error_class'] or '?'} `{os.path.basename(c['copy'])}`" for c in aborts]
        lines.append("")
    lines += ["## Files", ""] + [f"- `{name}`" for name in result["files"]] + [""]
    lines += ["## Next steps", ""]
    if copied:
        lines += [
            f"1. A cooldown sentinel holds MLX work until {result['sentinel_until'] or 'n/a'}; "
            "`metal-guard panic-gate` shows the verdict.",
            "2. Read `breadcrumb_tail.log` backwards from the panic time: the last LOAD / "
            "SUBPROC_PRE lines name the model and phase that was running.",
            "3. Check the model against the panic registry (`metal-guard check-model MODEL`) "
            "and lower context / batch size, or isolate it in a worker.",
            "4. File the panic with Apple: `apple_feedback.md` is ready to paste into "
            "Feedback Assistant.",
            "5. After two panics in 24 h (or three in 72 h) the gate locks out until "
            "`metal-guard ack`; acknowledge only after changing something.",
        ]
    else:
        lines += ["No GPU kernel panic in the last 24 h. If the machine rebooted anyway, check "
                  "`metal-guard panics --all` for non-GPU panics and the breadcrumb tail."]
    return "\n".join(lines) + "\n"


def run_postmortem(
    output_dir: Path | str, *, now: datetime | float | None = None, settings: Any = None,
    hours: float = 24.0, max_reports: int = MAX_REPORTS, max_report_bytes: int = MAX_REPORT_BYTES,
    breadcrumb_lines: int = BREADCRUMB_LINES,
) -> dict[str, Any]:
    """Collect the bundle into ``output_dir``; see the module docstring.

    Returns ``{status, output_dir, panic_count, abort_count, index, sentinel, files, errors}``;
    ``status`` is ``"disabled"`` under ``METALGUARD_POSTMORTEM_DISABLED=1``. Raises
    ``NotADirectoryError`` when ``output_dir`` exists and is not a directory, and
    :class:`~metal_guard.forensics.safefs.UnsafePathError` (an ``OSError``) when it is a
    symlink, someone else's, non-empty without being an earlier bundle, or holds a symlink.
    """
    if settings is None:
        from metal_guard.settings import get_settings

        settings = get_settings()
    if settings.postmortem_disabled:
        return {"status": "disabled", "output_dir": str(output_dir), "panic_count": 0}
    now_ts = time.time() if now is None else (now.timestamp() if isinstance(now, datetime) else float(now))
    with BundleDir.open(output_dir) as bundle:
        return _collect(bundle, settings, now_ts, hours, max_reports, max_report_bytes,
                        breadcrumb_lines)


def _collect(bundle: BundleDir, settings: Any, now_ts: float, hours: float, max_reports: int,
             max_report_bytes: int, breadcrumb_lines: int) -> dict[str, Any]:
    from metal_guard.forensics.gate import evaluate_panic_cooldown, mark_panic_sentinel_cooldown
    from metal_guard.forensics.listing import RootFds
    from metal_guard.forensics.reports import scan_reports
    from metal_guard.forensics.scancache import CACHE_FILE

    out = bundle.path
    errors: dict[str, str] = {}
    files: list[str] = []
    scan = scan_reports(settings.report_dirs, panic_since_ts=now_ts - hours * 3600,
                        crash_since_ts=now_ts - hours * 3600, now=now_ts,
                        cache_path=settings.cache_file(CACHE_FILE))
    for err in scan.errors:
        errors.setdefault("reports", err)
    gpu_panics = [r for r in scan.panics if r.is_gpu][:max_reports]
    gpu_aborts = [r for r in scan.crashes if r.is_gpu][:max_reports]
    copied: list[dict[str, Any]] = []
    aborts: list[dict[str, Any]] = []
    roots = RootFds()
    try:
        for records, sub, sink in ((gpu_panics, "panics", copied), (gpu_aborts, "aborts", aborts)):
            for rec in records:
                try:
                    sink.append(_copy_report(rec, scan.sources.get(rec.path), roots, bundle, sub,
                                             max_report_bytes))
                    files.append(f"{sub}/{os.path.basename(sink[-1]['copy'])}")
                except (OSError, ValueError) as exc:
                    errors[f"copy:{os.path.basename(rec.path)}"] = f"{type(exc).__name__}: {exc}"
    finally:
        roots.close()

    tail: list[str] = []
    try:
        from metal_guard.breadcrumbs import read_lines

        tail = read_lines(breadcrumb_lines, max_bytes=4 << 20)
        bundle.write_text("breadcrumb_tail.log", "\n".join(tail) + ("\n" if tail else ""))
        files.append("breadcrumb_tail.log")
    except Exception as exc:
        errors["breadcrumbs"] = f"{type(exc).__name__}: {exc}"

    try:
        data = _read_tail(settings.state_file("panics.jsonl"), MAX_ARCHIVE_BYTES)
        bundle.write_bytes("panics.jsonl", data)
        files.append("panics.jsonl")
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        errors["panics.jsonl"] = f"{type(exc).__name__}: {exc}"

    verdict = evaluate_panic_cooldown(now=now_ts, settings=settings)
    system: dict[str, Any] | None = None
    try:
        system = _system_info(verdict, settings, panics_found=bool(gpu_panics))
        system["gate"] = verdict.to_dict()
        system["collected_at"] = _iso(now_ts)
        bundle.write_text("system.json", json.dumps(system, indent=2, sort_keys=True, default=str) + "\n")
        files.append("system.json")
    except Exception as exc:
        errors["system"] = f"{type(exc).__name__}: {exc}"

    sentinel: str | None = None
    sentinel_until: str | None = None
    if gpu_panics:
        hours_ = settings.postmortem_sentinel_h
        sentinel = str(mark_panic_sentinel_cooldown(
            hours_, now=now_ts, settings=settings,
            reason=f"postmortem found {len(gpu_panics)} GPU kernel panic(s)"))
        sentinel_until = _iso(now_ts + hours_ * 3600)
        try:
            from metal_guard.forensics.feedback import format_panic_for_apple_feedback

            text = format_panic_for_apple_feedback(gpu_panics[0], breadcrumb_tail=tail, system=system)
            bundle.write_text("apple_feedback.md", text)
            files.append("apple_feedback.md")
        except Exception as exc:
            errors["apple_feedback"] = f"{type(exc).__name__}: {exc}"

    result: dict[str, Any] = {
        "status": "ok", "output_dir": str(out), "panic_count": len(gpu_panics),
        "abort_count": len(gpu_aborts), "sentinel": sentinel, "sentinel_until": sentinel_until,
        "files": files, "errors": errors, "index": str(out / "index.md"),
    }
    result["files"] = [*files, "index.md", "postmortem.json"]
    bundle.write_text("index.md", _index(result, verdict, copied, aborts, now_ts))
    bundle.write_text("postmortem.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def _read_tail(path: Path, max_bytes: int) -> bytes:
    """The last ``max_bytes`` of a regular file (from a line start), without following a link.

    ``FileNotFoundError`` when it is missing, ``ValueError`` when it is not a regular file,
    ``OSError`` when it cannot be read.
    """
    got = read_bytes_capped(path, max_bytes, tail=True)
    if got is None:
        raise FileNotFoundError(path)
    data, cut = got
    return data.partition(b"\n")[2] if cut else data
