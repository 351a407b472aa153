"""Records shared by the report parsers, the gate, the breaker and the status snapshot."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["AbortRecord", "PanicRecord"]

#: ``PanicRecord.kind`` values.
KERNEL_PANIC = "kernel_panic"
PROCESS_CRASH = "process_crash"


@dataclass(frozen=True)
class PanicRecord:
    """One kernel panic (``.panic``) or process crash (``.ips``) report, parsed and classified.

    ``timestamp`` is a UTC epoch taken from the report header (file mtime only as a fallback,
    flagged by ``timestamp_source``). ``is_gpu`` is True when the classifier matched an IOGPU
    kernel-panic signature (or, for crash reports, a GPU abort); only those count toward the
    gate and the circuit breaker. ``report_id`` identifies the report across re-scans
    (incident id from the header when present, else file name + timestamp) and is what
    ``ingest_panics_jsonl`` dedupes on.
    """

    path: str
    timestamp: float
    kind: str = KERNEL_PANIC
    is_gpu: bool = False
    signature: str | None = None
    error_class: str | None = None
    explanation: str = ""
    pid: int | None = None
    process: str | None = None
    report_id: str = ""
    timestamp_source: str = "header"
    excerpt: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def when(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp, UTC)

    @property
    def identity(self) -> str:
        return self.report_id or f"{self.path}@{int(self.timestamp)}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ts"] = self.timestamp  # seed-compatible key
        data["iso_time"] = self.when.isoformat()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PanicRecord:
        """Rebuild from :meth:`to_dict` output or a seed-format ``panics.jsonl`` line
        (``{ts, signature, explanation, pid, source_file}``). Raises ``ValueError`` on junk."""
        if not isinstance(data, dict):
            raise ValueError("panic record must be a JSON object")
        ts = data.get("timestamp", data.get("ts"))
        if not isinstance(ts, (int, float)) or isinstance(ts, bool):
            raise ValueError("panic record has no numeric timestamp")
        path = data.get("path", data.get("source_file", ""))
        pid = data.get("pid")
        return cls(
            path=str(path or ""),
            timestamp=float(ts),
            kind=str(data.get("kind") or KERNEL_PANIC),
            is_gpu=bool(data.get("is_gpu", data.get("signature") not in (None, "", "unknown"))),
            signature=data.get("signature") if isinstance(data.get("signature"), str) else None,
            error_class=data.get("error_class") if isinstance(data.get("error_class"), str) else None,
            explanation=str(data.get("explanation") or ""),
            pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            process=data.get("process") if isinstance(data.get("process"), str) else None,
            report_id=str(data.get("report_id") or ""),
            timestamp_source=str(data.get("timestamp_source") or "header"),
            excerpt=str(data.get("excerpt") or "")[:2000],
        )


#: A process-crash record is the same shape; the alias keeps the seed's name.
AbortRecord = PanicRecord
