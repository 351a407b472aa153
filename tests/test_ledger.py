"""ledger.py: the measured-peak ledger (round trip, lookup rules, quarantine, a real MLX peak)."""

from __future__ import annotations

import pytest

from metal_guard import backend, ledger
from metal_guard.settings import get_settings

mx = pytest.importorskip("mlx.core")
MIB = 1 << 20


def test_ledger_round_trip_and_key() -> None:
    entry = ledger.record_peak("org/Model-4bit", 5_000_000, context_tokens=4096,
                               footprint_delta_bytes=6_000_000)
    assert entry["quantization"] == "4bit"  # from the name
    assert entry["mlx_version"] == backend.mlx_version()
    assert entry["chip"] and entry["samples"] == 1
    assert entry["required_bytes"] == 6_000_000
    path = ledger.ledger_path()
    assert path == get_settings().state_file("peak_ledger.json") and path.is_file()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert ledger.lookup_peak("org/Model-4bit", context_tokens=4096) == entry
    again = ledger.record_peak("org/Model-4bit", 3_000_000, context_tokens=4096)
    assert again["samples"] == 2 and again["peak_bytes"] == 5_000_000 and again["last_peak_bytes"] == 3_000_000
    assert len(ledger.ledger_entries()) == 1


def test_ledger_lookup_rules() -> None:
    for ctx, peak in ((2048, 1_000), (8192, 4_000), (32768, 9_000)):
        ledger.record_peak("org/M-8bit", peak, context_tokens=ctx)
    assert ledger.lookup_peak("org/M-8bit", context_tokens=8192)["peak_bytes"] == 4_000
    assert ledger.lookup_peak("org/M-8bit", context_tokens=4096)["peak_bytes"] == 4_000  # next larger
    assert ledger.lookup_peak("org/M-8bit", context_tokens=65536) is None  # nothing that large
    assert ledger.lookup_peak("org/M-8bit")["peak_bytes"] == 9_000  # largest when unspecified
    assert ledger.lookup_peak("org/M-8bit", mlx_version="0.31.0") is None
    assert ledger.lookup_peak("org/M-8bit", chip="Apple M9") is None
    assert ledger.lookup_peak("org/M-8bit", quantization="4bit") is None
    assert ledger.lookup_peak("org/Unknown") is None
    assert ledger.forget_peaks("org/M-8bit") == 3 and ledger.ledger_entries() == []


def test_corrupt_ledger_is_quarantined() -> None:
    path = ledger.ledger_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    assert ledger.ledger_entries() == []
    assert list(path.parent.glob("peak_ledger.json.corrupt-*"))
    ledger.record_peak("org/A-4bit", 1)
    assert len(ledger.ledger_entries()) == 1


def test_record_peak_validates() -> None:
    with pytest.raises(ValueError):
        ledger.record_peak("", 1)
    with pytest.raises(ValueError):
        ledger.record_peak("x", -1)


def test_measure_peak_records_a_real_peak() -> None:
    with ledger.measure_peak("org/Measured-4bit", context_tokens=128) as m:
        a = mx.ones((32 * MIB // 4,), dtype=mx.float32)
        mx.eval(a)
        del a
    assert m.peak_bytes is not None and m.peak_bytes >= 32 * MIB
    assert m.entry is not None
    assert ledger.lookup_peak("org/Measured-4bit", context_tokens=128)["peak_bytes"] == m.peak_bytes

    with pytest.raises(RuntimeError), ledger.measure_peak("org/Failed-4bit"):
        raise RuntimeError("load failed")
    assert ledger.lookup_peak("org/Failed-4bit") is None
