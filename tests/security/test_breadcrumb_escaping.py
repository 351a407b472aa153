"""Issue 11, item 2 (the log side): one escaping scheme for every character any reader treats as
a line or field break, and a reader that splits on ``\\n`` only. Property: arbitrary Unicode in
the payload and in meta values round-trips exactly, and every record is one line under every
way of splitting lines (``str.splitlines``, ``bytes.splitlines``, ``\\n``)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from metal_guard import breadcrumbs
from metal_guard.forensics.orphans import pair_breadcrumbs, scan_orphan_subproc_pre
from metal_guard.settings import get_settings

#: Every character some reader treats as a line or field separator.
BREAKERS = ["\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\u2028",
            "\u2029", "\t", " ", "|", "=", "\\", '"', "\x00", "\x18", "\u00a0", "\u3000",
            "\ufeff", "\ud800", "\U0001f600", "]", "["]

nasty_text = st.text(
    alphabet=st.one_of(st.sampled_from(BREAKERS), st.characters(codec=None)), max_size=60)
meta_keys = st.from_regex(r"\A[a-z][a-z0-9_]{0,8}\Z")


@settings(max_examples=400, deadline=None)
@given(tag=st.sampled_from(["SUBPROC_PRE", "SUBPROC_POST", "SERVER_SWITCH", "LOAD"]),
       payload=nasty_text, meta=st.dictionaries(meta_keys, nasty_text, max_size=4))
def test_round_trip_and_one_line_per_record(tag: str, payload: str, meta: dict[str, str]) -> None:
    line = breadcrumbs.format_line(tag, payload, **meta)
    assert line.splitlines() == [line]
    encoded = line.encode("utf-8")
    assert encoded.splitlines() == [encoded] and b"\n" not in encoded
    assert all(ch.isprintable() for ch in line)  # nothing any reader could split on but " "
    assert breadcrumbs.TORN_MARK not in line
    parsed = breadcrumbs.parse_line(line)
    assert parsed is not None
    assert (parsed.tag, parsed.payload, parsed.meta) == (tag, payload, meta)


@settings(max_examples=150, deadline=None)
@given(payloads=st.lists(nasty_text, min_size=1, max_size=6), value=nasty_text)
def test_round_trip_through_the_real_log(payloads: list[str], value: str) -> None:
    path = get_settings().resolved_breadcrumb_path
    path.unlink(missing_ok=True)
    for payload in payloads:
        assert breadcrumbs.breadcrumb_with_meta("NOTE", payload, durable=False, v=value)
    crumbs = breadcrumbs.tail(100)
    assert [(c.payload, c.meta) for c in crumbs] == [(p, {"v": value}) for p in payloads]


@settings(max_examples=200, deadline=None)
@given(model=nasty_text, previous=nasty_text, pid=st.integers(min_value=1, max_value=10**9))
def test_no_model_name_or_path_forges_a_worker_record(model: str, previous: str, pid: int) -> None:
    forged = f"[{datetime.now(UTC).isoformat()}] SUBPROC_PRE: evil | pid={pid} create_time=1.0"
    lines = [
        breadcrumbs.format_line("SERVER_SWITCH", f"x{sep}{forged}", previous=previous)
        for sep in ("\u2028", "\n", "\r", "\x85", "\x1e")
    ] + [
        breadcrumbs.format_line("SERVER_SWITCH", model, previous=f"m\tpid={pid}\tcreate_time=1.0"),
        breadcrumbs.format_line("SERVER_CADENCE_WAIT", model + " | pid=" + str(pid)),
    ]
    raw = "\n".join(lines) + "\n"
    for splitter in (str.splitlines, lambda t: t.split("\n")):
        assert pair_breadcrumbs(splitter(raw)) == []  # type: ignore[operator]
    for line in lines:
        parsed = breadcrumbs.parse_line(line)
        assert parsed is not None and parsed.tag.startswith("SERVER_")
        assert "pid" not in parsed.meta and "create_time" not in parsed.meta


def test_reader_splits_on_newline_only() -> None:
    path = get_settings().resolved_breadcrumb_path
    path.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC).isoformat()
    # a foreign (unescaped) writer put a U+2028 and a \x1e inside one line
    path.write_text(f"[{now}] NOTE: a\u2028[{now}] SUBPROC_PRE: evil\x1e | pid=1\n", encoding="utf-8")
    lines = breadcrumbs.read_lines(10)
    assert len(lines) == 1
    assert scan_orphan_subproc_pre(threshold_sec=0, now=time.time() + 1) == []
