"""forensics.reports / forensics.formats: parsing, classification and safe scanning."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from report_factory import (
    FIXTURES,
    PENDING_219,
    UNDERFLOW_550,
    copy_fixtures,
    panic_report,
    write_panic,
)

from metal_guard.forensics import reports
from metal_guard.forensics.formats import parse_apple_date, parse_report_text
from metal_guard.forensics.records import KERNEL_PANIC, PROCESS_CRASH
from metal_guard.forensics.reports import (
    parse_panic_reports,
    parse_report_bytes,
    parse_report_file,
    scan_reports,
)

# file name -> (kind, is_gpu, signature)
EXPECTED = {
    "panic-full-2026-08-20-070924.0002.panic": (KERNEL_PANIC, True, "prepare_count_underflow"),
    "panic-full-2026-08-18-221530.0002.panic": (KERNEL_PANIC, True, "prepare_count_underflow"),
    "panic-full-2026-08-19-101200.0002.panic": (KERNEL_PANIC, True, "pending_memory_set"),
    "panic-full-2026-08-17-031402.0002.panic": (KERNEL_PANIC, True, "remove_memory_object"),
    "panic-full-2026-08-20-143301.0002.panic": (KERNEL_PANIC, False, None),  # watchdogd
    "panic-full-2026-08-20-114400.0002.panic": (KERNEL_PANIC, False, None),  # Intel
    "panic-full-2026-08-20-083000.0002.panic": (KERNEL_PANIC, True, "prepare_count_underflow"),
    "Python-2026-08-20-093011.ips": (PROCESS_CRASH, True, "completion_abort"),
    "python3.11_2026-08-20-091500_text.crash": (PROCESS_CRASH, True, "completion_abort"),
    "Safari-2026-08-20-101500.ips": (PROCESS_CRASH, False, None),
    "gpuEvent-python3.12-2026-08-20-092000.ips": ("gpu_event", True, None),
    "Kernel-2019-05-02-101213.panic": (KERNEL_PANIC, False, None),
}
JUNK = ("panic-full-2026-08-20-083500.0002.panic", "panic-full-2026-08-20-120000.0002.panic")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_is_parsed_and_classified(name: str) -> None:
    record = parse_report_file(FIXTURES / name)
    assert record is not None
    kind, is_gpu, signature = EXPECTED[name]
    assert (record.kind, record.is_gpu) == (kind, is_gpu)
    assert record.signature == signature  # None: no known panic signature in that report
    assert record.report_id


@pytest.mark.parametrize("name", JUNK)
def test_junk_and_header_cut_reports_are_skipped(name: str) -> None:
    assert parse_report_file(FIXTURES / name) is None


def test_every_iogpu_line_number_and_group_memory_variant_counts() -> None:
    text = {n: parse_report_file(FIXTURES / n) for n in EXPECTED}
    lines = {r.extra.get("panic_line", "") for r in text.values() if r and r.is_gpu and r.kind == KERNEL_PANIC}
    joined = "\n".join(lines)
    for needle in ("IOGPUMemory.cpp:550", "IOGPUMemory.cpp:492", "IOGPUGroupMemory.cpp:219",
                   "IOGPUGroupMemory.cpp:323"):
        assert needle in joined


def test_timestamp_comes_from_the_header_not_mtime(tmp_path: Path) -> None:
    target = tmp_path / "panic-full-2026-08-20-070924.0002.panic"
    target.write_bytes((FIXTURES / target.name).read_bytes())
    os.utime(target, (1_900_000_000, 1_900_000_000))
    record = parse_report_file(target)
    assert record is not None and record.timestamp_source == "header"
    assert record.when == datetime.fromisoformat("2026-08-20T06:58:41-07:00")
    assert record.pid == 50218 and record.process == "Python"
    assert record.extra["iogpu_family_version"] == "130.13"


def test_intel_panic_reads_macos_panic_string() -> None:
    record = parse_report_file(FIXTURES / "panic-full-2026-08-20-114400.0002.panic")
    assert record is not None
    assert record.extra["panic_line"].startswith("panic(cpu 2 caller 0xffffff8012a3b4c5): Kernel trap")
    assert record.timestamp_source == "header"


def test_metal_abort_ips_details() -> None:
    record = parse_report_file(FIXTURES / "Python-2026-08-20-093011.ips")
    assert record is not None
    assert record.extra["queue"] == "com.Metal.CompletionQueueDispatch"
    assert record.extra["signal"] == "SIGABRT" and record.extra["exception_type"] == "EXC_CRASH"
    assert record.error_class == "metal_completion_sigabrt"
    assert record.report_id == "623264A4-AE37-4413-9887-141FB816B238"
    assert "check_error" in record.excerpt


def test_libcxxabi_message_is_kept_when_present() -> None:
    header = json.dumps({"bug_type": "309", "timestamp": "2026-08-20 09:30:11.00 -0700"})
    body = json.dumps({"exception": {"type": "EXC_CRASH", "signal": "SIGABRT"}, "asi": {
        "libc++abi.dylib": ["libc++abi: terminating due to uncaught exception of type "
                            "std::runtime_error: [METAL] Command buffer execution failed: "
                            "Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)"]}})
    record = parse_report_bytes((header + "\n" + body).encode(), name="x.ips")
    assert record is not None and record.is_gpu
    assert "kIOGPUCommandBufferCallbackErrorOutOfMemory" in record.extra["abort_message"]


def test_truncated_report_is_salvaged_and_flagged() -> None:
    record = parse_report_file(FIXTURES / "panic-full-2026-08-20-083000.0002.panic")
    assert record is not None and record.is_gpu and record.extra.get("truncated") is True


def test_mtime_fallback_when_no_date_anywhere(tmp_path: Path) -> None:
    path = tmp_path / "odd.panic"
    path.write_text("*** Panic Report ***\npanic(cpu 0 caller 0x1): " + UNDERFLOW_550 + "\n")
    os.utime(path, (1_787_000_000, 1_787_000_000))
    record = parse_report_file(path)
    assert record is not None and record.is_gpu
    assert (record.timestamp, record.timestamp_source) == (1_787_000_000, "mtime")


def test_fifty_megabyte_report_reads_only_the_cap(tmp_path: Path) -> None:
    """Only the cap is read (the speed of it is benchmarks/report_scan.py's figure)."""
    path = write_panic(tmp_path, time.time() - 600, padding=50 * 1024 * 1024)
    assert path.stat().st_size > 50 * 1024 * 1024
    read: list[int] = []
    real = reports.read_report_bytes

    def counting(*args: Any, **kwargs: Any) -> tuple[bytes, int, float]:
        data, size, mtime = real(*args, **kwargs)
        read.append(len(data))
        return data, size, mtime

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reports, "read_report_bytes", counting)
        record = parse_report_file(path)
    assert record is not None and record.is_gpu and record.extra.get("truncated") is True
    assert read == [reports.MAX_READ_BYTES] and path.stat().st_size // 10 > reports.MAX_READ_BYTES


def test_symlink_out_of_the_reports_dir_is_not_followed(tmp_path: Path) -> None:
    outside, inside = tmp_path / "outside", tmp_path / "reports"
    secret = write_panic(outside, time.time() - 600)
    inside.mkdir()
    (inside / "panic-full-2099-01-01-000000.0002.panic").symlink_to(secret)
    assert scan_reports([inside], panic_since_ts=0).records == []
    # a link that stays inside the configured dirs is fine (and counted once)
    real = write_panic(inside, time.time() - 700, PENDING_219)
    (inside / "panic-full-2099-01-02-000000.0002.panic").symlink_to(real)
    records = scan_reports([inside], panic_since_ts=0).records
    assert [r.signature for r in records] == ["pending_memory_set"]


def test_fifo_and_directories_never_block_or_count(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "panic-full-2099-01-01-000000.0002.panic")
    (tmp_path / "panic-full-2099-01-02-000000.0002.panic").mkdir()
    result = scan_reports([tmp_path], panic_since_ts=0)
    assert result.records == [] and result.skipped == 2


def test_old_files_are_dropped_by_name_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    old = tmp_path / "panic-full-2020-01-01-000000.0002.panic"
    old.write_text(panic_report(now - 60))  # contents claim "recent": must not be read at all
    nameless = tmp_path / "mystery.panic"
    nameless.write_text(panic_report(now - 60))
    os.utime(nameless, (now - 30 * 86400, now - 30 * 86400))
    fresh = write_panic(tmp_path, now - 3600)
    reads: list[str] = []
    real = reports.read_report_bytes
    monkeypatch.setattr(reports, "read_report_bytes",
                        lambda p, m=reports.MAX_READ_BYTES, **kw: reads.append(str(p)) or real(p, m, **kw))
    records = scan_reports([tmp_path], panic_since_ts=now - 72 * 3600, now=now).records
    assert [r.path for r in records] == [str(fresh)]
    assert reads == [str(fresh)]


def test_header_time_filters_after_reading(tmp_path: Path) -> None:
    now = time.time()
    stale = write_panic(tmp_path, now - 10 * 86400, written_after_sec=9 * 86400)  # name says recent
    assert scan_reports([tmp_path], panic_since_ts=now - 72 * 3600, now=now).records == []
    assert stale.exists()


def test_unlistable_or_bogus_dirs_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert scan_reports([not_a_dir]).errors
    assert scan_reports([tmp_path / "missing"]).errors == []  # absent dirs are normal on Linux
    denied = tmp_path / "denied"
    denied.mkdir()
    real = os.listdir

    def listdir(path: object) -> object:
        if str(path) == str(denied):
            raise PermissionError(13, "Permission denied")
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(reports.os, "listdir", listdir)
    assert "cannot list" in scan_reports([denied]).errors[0]


def test_unreadable_recent_panic_is_an_error_but_unreadable_crash_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = time.time()
    write_panic(tmp_path, now - 600)
    (tmp_path / f"Python-{datetime.fromtimestamp(now).strftime('%Y-%m-%d-%H%M%S')}.ips").write_text("{}")

    def deny(path: object, max_bytes: int = 0, **kw: object) -> tuple[bytes, int, float]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(reports, "read_report_bytes", deny)
    result = scan_reports([tmp_path], panic_since_ts=now - 3600, crash_since_ts=now - 3600, now=now)
    assert len(result.errors) == 1 and "panic-full" in result.errors[0]


def test_thousands_of_old_reports_are_skipped_unread(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Reports older than the window are skipped by their name, never opened (the scan's speed
    over 10,000 files is benchmarks/report_scan.py's figure)."""
    now = time.time()
    for i in range(3_000):
        stamp = datetime.fromtimestamp(now - 10 * 86400 - i * 3600).strftime("%Y-%m-%d-%H%M%S")
        name = f"panic-full-{stamp}.0002.panic" if i % 3 == 0 else f"Python-{stamp}.ips"
        (tmp_path / name).write_text("{}")
    fresh = write_panic(tmp_path, now - 3600)
    opened: list[str] = []
    real = reports.read_report_bytes

    def counting(path: Any, *args: Any, **kwargs: Any) -> tuple[bytes, int, float]:
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(reports, "read_report_bytes", counting)
    result = scan_reports([tmp_path], panic_since_ts=now - 72 * 3600, crash_since_ts=now - 86400, now=now)
    assert len(result.records) == 1 and result.candidates == 1
    assert opened == [fresh.name]


def test_parse_panic_reports_seed_signature(tmp_path: Path) -> None:
    copy_fixtures(tmp_path)
    records = parse_panic_reports(tmp_path, since_ts=datetime.fromisoformat("2026-08-19T00:00:00+00:00").timestamp(),
                                  now=datetime.fromisoformat("2026-08-21T00:00:00+00:00"))
    assert all(r.kind == KERNEL_PANIC for r in records)
    assert {r.is_gpu for r in records} == {True, False}  # non-GPU panics are listed too
    assert records == sorted(records, key=lambda r: r.timestamp, reverse=True)
    gpu = parse_panic_reports([tmp_path], gpu_only=True, now=datetime.fromisoformat("2026-08-21T00:00:00+00:00"))
    assert len(gpu) == 5 and all(r.is_gpu for r in gpu)


def test_apple_dates() -> None:
    assert parse_apple_date("2026-03-30 15:06:50.00 -0700") == datetime.fromisoformat(
        "2026-03-30T15:06:50-07:00").timestamp()
    assert parse_apple_date("2026-03-30T22:06:50Z") == datetime.fromisoformat("2026-03-30T22:06:50+00:00").timestamp()
    assert parse_apple_date("garbage") is None and parse_apple_date(None) is None
    assert parse_apple_date("1900-01-01 00:00:00 +0000") is None  # outside the sane range


# --------------------------------------------------------------------------- fuzzing

_FIXTURE_TEXTS = [p.read_bytes() for p in sorted(FIXTURES.iterdir()) if p.suffix in (".panic", ".ips", ".crash")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=3000))
def test_fuzz_text_never_raises(text: str) -> None:
    parse_report_text(text)
    parse_report_bytes(text.encode("utf-8", "surrogatepass"), name="x.panic")
    parse_apple_date(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_fuzz_bytes_never_raises(data: bytes) -> None:
    parse_report_bytes(data, name="x.ips", mtime=1.0)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)
_keys = st.sampled_from(["panicString", "macOSPanicString", "exception", "threads", "faultingThread",
                         "asi", "usedImages", "legacyInfo", "termination", "date", "captureTime",
                         "pid", "procName", "analysis", "incident"])


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["210", "309", "284", "109", "", 210, None]), st.dictionaries(_keys, _json, max_size=8),
       st.dictionaries(st.sampled_from(["timestamp", "incident_id", "os_version", "app_name"]), _json, max_size=4))
def test_fuzz_structured_reports_never_raise(bug_type: object, body: dict, header: dict) -> None:
    text = json.dumps({"bug_type": bug_type, **header}) + "\n" + json.dumps(body)
    parse_report_text(text)
    parse_report_bytes(text.encode(), name="x.ips", mtime=1.0)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_FIXTURE_TEXTS), st.integers(min_value=0, max_value=20000),
       st.integers(min_value=0, max_value=20000), st.binary(max_size=20))
def test_fuzz_mutated_fixtures_never_raise(data: bytes, cut: int, where: int, junk: bytes) -> None:
    mutated = data[:where] + junk + data[where + len(junk):]
    parse_report_bytes(mutated[:cut], name="m.panic", mtime=1.0)
    parse_report_bytes(mutated, name="m.ips", mtime=1.0)


def test_scan_cache_skips_unchanged_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    reports_dir, cache = tmp_path / "r", tmp_path / "cache" / "scan.json"
    first = write_panic(reports_dir, now - 3600)
    (reports_dir / f"panic-full-{datetime.fromtimestamp(now).strftime('%Y-%m-%d-%H%M%S')}.0009.panic").write_bytes(b"\x00junk" * 10)
    reads: list[str] = []
    real = reports.read_report_bytes
    monkeypatch.setattr(reports, "read_report_bytes",
                        lambda p, m=reports.MAX_READ_BYTES, **kw: reads.append(os.path.basename(str(p))) or real(p, m, **kw))

    def scan() -> list[str]:
        res = scan_reports([reports_dir], panic_since_ts=now - 72 * 3600, now=now, cache_path=cache)
        return [r.signature or "" for r in res.records]

    assert scan() == ["prepare_count_underflow"] and len(reads) == 2
    reads.clear()
    assert scan() == ["prepare_count_underflow"] and reads == []  # both served from the cache
    first.write_text(panic_report(now - 3600, PENDING_219))  # changed content -> re-read
    assert scan() == ["pending_memory_set"] and reads == [first.name]
    cache.write_text("{not json")
    reads.clear()
    assert scan() == ["pending_memory_set"] and len(reads) == 2  # corrupt cache: parse everything
    data = json.loads(cache.read_text())
    data["format"] = "0:old"
    cache.write_text(json.dumps(data))
    reads.clear()
    scan()
    assert len(reads) == 2  # another version's cache is ignored
