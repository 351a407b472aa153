"""A fake Mac for the readers' ``runner`` hook: answers from captured real outputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

FIX = Path(__file__).parent / "fixtures" / "macos"


def fixture(name: str) -> str:
    return (FIX / name).read_text()


class FakeMac:
    """A runner that answers like a Mac, from fixture files; records every call."""

    def __init__(self, **overrides: str | None) -> None:
        self.outputs: dict[str, str | None] = {
            "hw.memsize": fixture("sysctl_hw_memsize.txt"),
            "machdep.cpu.brand_string": fixture("sysctl_cpu_brand_string.txt"),
            "iogpu.wired_limit_mb": fixture("sysctl_wired_limit_default.txt"),
            "kern.memorystatus_vm_pressure_level": fixture("sysctl_pressure_level_normal.txt"),
            "vm.swapusage": fixture("sysctl_swapusage.txt"),
            "iogpu.rsrc_limit": None,
            "vm_stat": fixture("vm_stat.txt"),
            "kmutil": fixture("kmutil_showloaded_iogpufamily.txt"),
            "kextstat": fixture("kextstat_iogpufamily.txt"),
            "ioreg": fixture("ioreg_ioaccelerator.txt"),
        }
        self.outputs.update({k.replace("__", "."): v for k, v in overrides.items()})
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> str | None:
        assert timeout > 0
        self.calls.append(list(argv))
        key = argv[-1] if argv[0] == "sysctl" else argv[0]
        return self.outputs.get(key)
