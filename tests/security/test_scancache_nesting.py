"""Issue 11 item 6 (forensics part): deeply nested or hostile JSON in the scan cache or a report.

The report-scan cache is "disposable" but was parsed with ``json.loads`` catching only
``ValueError``: ``[`` x 100k raised ``RecursionError`` and the gate answered "internal error"
(exit 3) on every run, forever. Now any nesting depth, any junk, oversize file or wrongly typed
entry in the cache means those reports are parsed again and the cache is rewritten; nesting in a
report makes that report junk (or a non-GPU record), never an exception.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from report_factory import write_panic

from metal_guard.forensics import scancache
from metal_guard.forensics.gate import SCAN_CACHE_FILE, evaluate_panic_cooldown
from metal_guard.forensics.reports import parse_report_bytes, scan_reports
from metal_guard.settings import get_settings

OPENERS = ("[", '{"a":', '{"entries":{"x":', '{"format":"2","entries":{"p":{"record":')
_HEALTH = list(HealthCheck)


def _nested(opener: str, depth: int, closed: bool) -> str:
    closer = {"[": "]", '{"a":': "}", '{"entries":{"x":': "}}", '{"format":"2","entries":{"p":{"record":': "}}}"}
    return opener * depth + ("1" + closer[opener] * depth if closed else "")


@settings(max_examples=20, deadline=None, suppress_health_check=_HEALTH)
@given(opener=st.sampled_from(OPENERS), depth=st.integers(min_value=1, max_value=200_000),
       closed=st.booleans())
def test_nested_scan_cache_never_breaks_the_gate_and_is_rebuilt(
    rdir: Path, opener: str, depth: int, closed: bool
) -> None:
    now = time.time()
    if not any(rdir.iterdir()):
        write_panic(rdir, now - 600)
    cache = get_settings().cache_file(SCAN_CACHE_FILE)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(_nested(opener, depth, closed))
    v = evaluate_panic_cooldown(now=now)
    assert (v.exit_code, v.state, v.recent_panics_24h) == (2, "cooldown", 1), v.reason
    rebuilt = json.loads(cache.read_text())  # rewritten as a valid, shallow cache
    assert rebuilt["format"] == scancache.FORMAT and len(rebuilt["entries"]) == 1


_scalar = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_value = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=10)


def _wrong_type(field: str, value: object, original: object) -> bool:
    """Is ``value`` ill-typed for ``field`` (a well-typed value is trusted: the cache is ours)?"""
    if field == "bogus":
        return True
    if field == "path":
        return value != original
    if field == "timestamp":
        return isinstance(value, bool) or not isinstance(value, int | float) or value != value \
            or value in (float("inf"), float("-inf"))
    if field == "is_gpu":
        return not isinstance(value, bool)
    if field == "pid":
        return value is not None and (isinstance(value, bool) or not isinstance(value, int))
    if field == "extra":
        return not isinstance(value, dict)
    if field == "signature":
        return value is not None and not isinstance(value, str)
    return not isinstance(value, str)


@settings(max_examples=40, deadline=None, suppress_health_check=_HEALTH)
@given(field=st.sampled_from(["path", "timestamp", "kind", "is_gpu", "signature", "pid", "extra",
                              "report_id", "excerpt", "bogus"]), value=_value)
def test_wrongly_typed_cache_entries_are_reparsed_not_trusted(field: str, value: object) -> None:
    import tempfile

    now = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        reports, cache = Path(tmp) / "r", Path(tmp) / "cache.json"
        write_panic(reports, now - 600)
        first = scan_reports([reports], panic_since_ts=now - 3600, now=now, cache_path=cache)
        data = json.loads(cache.read_text())
        [entry] = data["entries"].values()
        assume(_wrong_type(field, value, entry["record"].get(field)))
        entry["record"][field] = value
        cache.write_text(json.dumps(data))
        again = scan_reports([reports], panic_since_ts=now - 3600, now=now, cache_path=cache)
    assert [r.to_dict() for r in again.records] == [r.to_dict() for r in first.records]
    rec = again.records[0]
    assert isinstance(rec.timestamp, float) and rec.is_gpu is True and isinstance(rec.extra, dict)


def test_oversize_or_linked_cache_is_ignored_and_replaced(tmp_path: Path) -> None:
    now = time.time()
    reports = tmp_path / "r"
    write_panic(reports, now - 600)
    cache = tmp_path / "cache.json"
    with cache.open("wb") as fh:  # valid JSON, but over the cap: never read whole
        fh.write(b'{"pad":"' + b"x" * (scancache.MAX_CACHE_BYTES + 10) + b'"}')
    assert len(scan_reports([reports], panic_since_ts=now - 3600, now=now, cache_path=cache).records) == 1
    assert cache.stat().st_size < 1 << 20
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    cache.unlink()
    cache.symlink_to(target)
    assert len(scan_reports([reports], panic_since_ts=now - 3600, now=now, cache_path=cache).records) == 1
    assert target.read_text() == "{}"  # the link was replaced, not written through


@settings(max_examples=30, deadline=None, suppress_health_check=_HEALTH)
@given(opener=st.sampled_from(OPENERS[:2]), depth=st.integers(min_value=1, max_value=200_000),
       where=st.sampled_from(["header", "body", "whole"]), bug_type=st.sampled_from(["210", "309", "284"]))
def test_nested_reports_are_junk_or_non_gpu_never_an_exception(
    opener: str, depth: int, where: str, bug_type: str
) -> None:
    nested = _nested(opener, depth, closed=True)
    header = json.dumps({"bug_type": bug_type, "timestamp": "2026-08-20 06:58:41.00 -0700"})
    text = {"header": nested + "\n{}\n", "body": header + "\n" + nested + "\n",
            "whole": "{\n" + nested}[where]
    rec = parse_report_bytes(text.encode(), name="x.panic", path="x.panic", mtime=1.0)
    assert rec is None or (not rec.is_gpu or bug_type == "284")
