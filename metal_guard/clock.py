"""Time helpers shared by the state, forensics and status layers.

Functions that depend on "now" take ``now=`` (a UTC epoch float or an aware ``datetime``) so
tests drive them with an injected clock; :func:`now_ts` turns that argument into an epoch.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

__all__ = ["now_ts", "utc_iso"]


def now_ts(now: datetime | float | None = None) -> float:
    """``now`` as a UTC epoch; the current time when ``now`` is ``None``."""
    if now is None:
        return time.time()
    return now.timestamp() if isinstance(now, datetime) else float(now)


def utc_iso(ts: float) -> str:
    """An epoch as an ISO-8601 UTC string (``2026-11-25T19:07:39.123456+00:00``)."""
    return datetime.fromtimestamp(ts, UTC).isoformat()
