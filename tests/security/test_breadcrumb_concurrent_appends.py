"""Issue 11, items 2 and 5 under contention: several processes appending breadcrumbs and JSONL
records at once (with busy processes beside them, and a torn line to heal at the start) leave
exactly one parseable line per record, none lost, none merged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from metal_guard import breadcrumbs, storage

WRITER = r"""
import sys
from pathlib import Path
from metal_guard import breadcrumbs, storage
who, n, log, jsonl = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
for i in range(n):
    assert breadcrumbs.breadcrumb_with_meta("SUBPROC_PRE", f"{who}\u2028{i}\tx | y", durable=False,
                                            log_path=log, i=i, who=who)
    storage.append_jsonl(jsonl, {"who": who, "i": i, "pad": "z" * (i % 300)}, fsync=False)
"""


def test_concurrent_appenders_leave_one_whole_line_per_record(metalguard_home: Path) -> None:
    state = storage.ensure_dir(metalguard_home / "state")
    log, jsonl = state / "metal_breadcrumb.log", state / "panics.jsonl"
    log.write_text("[2026-01-01T00:00:00+00:00] SUBPROC_POST: torn-by-a-cra")  # no newline
    jsonl.write_text('{"torn": ')
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, f"w{k}", "150", str(log),
                                     str(jsonl)]) for k in range(4)]
        assert [w.wait(timeout=300) for w in writers] == [0, 0, 0, 0]
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    crumbs = [c for c in (breadcrumbs.parse_line(x) for x in breadcrumbs.read_lines(10_000, path=log))
              if c is not None]
    got = sorted((c.meta["who"], int(c.meta["i"])) for c in crumbs)
    assert got == sorted((f"w{k}", i) for k in range(4) for i in range(150))
    assert all(c.payload == f"{c.meta['who']}\u2028{c.meta['i']}\tx | y" for c in crumbs)
    records, bad = storage.read_jsonl_counted(jsonl)
    assert sorted((r["who"], r["i"]) for r in records) == got and bad == 1  # the torn fragment
