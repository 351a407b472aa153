"""macos.py: the macOS readers' parsers on captured real outputs, the rusage struct layout."""

from __future__ import annotations

import ctypes

import pytest
from macos_fakes import FakeMac, fixture

from metal_guard import macos


@pytest.mark.parametrize(
    ("text", "name", "expected"),
    [
        ("hw.memsize: 34359738368\n", "hw.memsize", "34359738368"),
        ("34359738368\n", "hw.memsize", "34359738368"),
        ("hw.model: Mac14,12\nhw.memsize: 34359738368\n", "hw.memsize", "34359738368"),
        ("hw.model: Mac14,12\nhw.memsize: 34359738368\n", "hw.model", "Mac14,12"),
        ("machdep.cpu.brand_string: Apple M1 Pro\n", "machdep.cpu.brand_string", "Apple M1 Pro"),
        ("sysctl: unknown oid 'iogpu.rsrc_limit'\n", "iogpu.rsrc_limit", None),
        ("", "hw.memsize", None),
        (None, "hw.memsize", None),
    ],
)
def test_parse_sysctl(text: str | None, name: str, expected: str | None) -> None:
    assert macos.parse_sysctl(text, name) == expected


def test_sysctl_int_reads_set_output() -> None:
    runner = FakeMac(**{"iogpu__wired_limit_mb": fixture("sysctl_wired_limit_set.txt")})
    assert macos.read_sysctl_int("iogpu.wired_limit_mb", runner) == 14000


def test_parse_swapusage_units() -> None:
    small = macos.parse_swapusage(fixture("sysctl_swapusage.txt"))
    assert small == {"total_bytes": int(1.5 * 2**30), "used_bytes": 512 * 1024,
                     "free_bytes": int(1.5 * 2**30), "encrypted": True}
    heavy = macos.parse_swapusage(fixture("sysctl_swapusage_heavy.txt"))
    assert heavy is not None
    assert heavy["total_bytes"] == 8192 * 2**20
    assert heavy["used_bytes"] == int(6523.25 * 2**20)
    assert macos.parse_swapusage("garbage") is None


def test_parse_vm_stat() -> None:
    vm = macos.parse_vm_stat(fixture("vm_stat.txt"))
    assert vm is not None
    assert vm["page_size_bytes"] == 16384
    assert vm["free_bytes"] == 45231 * 16384
    assert vm["wired_down_bytes"] == 456789 * 16384
    assert vm["occupied_by_compressor_bytes"] == 98123 * 16384
    assert vm["file_backed_pages_bytes"] == 512341 * 16384
    assert macos.parse_vm_stat("no header here") is None


def test_parse_ioreg_performance_statistics() -> None:
    stats = macos.parse_ioreg_performance_statistics(fixture("ioreg_ioaccelerator.txt"))
    assert stats is not None
    assert stats["In use system memory"] == 1200357376
    assert stats["Alloc system memory"] == 4272832512
    assert stats["recoveryCount"] == 0
    assert macos.gpu_accelerator_stats(runner=FakeMac()) == stats


def test_rusage_struct_layout_and_fake_libproc() -> None:
    assert ctypes.sizeof(macos._RusageInfoV4) == 16 + 35 * 8
    assert macos._RusageInfoV4.ri_phys_footprint.offset == 72
    assert macos._RusageInfoV4.ri_lifetime_max_phys_footprint.offset == 16 + 28 * 8

    class FakeLibproc:
        def __init__(self) -> None:
            self.calls: list[tuple[int, int]] = []

        def proc_pid_rusage(self, pid: int, flavor: int, ptr: object) -> int:
            self.calls.append((pid, flavor))
            if pid == 999999:
                return -1
            info = ctypes.cast(ptr, ctypes.POINTER(macos._RusageInfoV4)).contents
            info.ri_resident_size = 1
            info.ri_phys_footprint = 123_456_789
            info.ri_lifetime_max_phys_footprint = 222_222_222
            return 0

    lib = FakeLibproc()
    fp = macos.rusage_footprint(4242, lib=lib)
    assert fp == macos.Footprint(4242, 123_456_789, 222_222_222, "ri_phys_footprint")
    assert lib.calls == [(4242, 4)]
    assert macos.rusage_footprint(999999, lib=lib) is None
