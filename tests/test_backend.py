from __future__ import annotations

import subprocess
import sys

from metal_guard import backend


def test_counters_are_real_bytes() -> None:
    mx = backend.core()
    assert mx is not None
    before = backend.memory_counters()
    assert before is not None and before.backend == "cpu"
    a = mx.zeros((64, 1024, 1024), dtype=mx.float32)  # 256 MiB
    mx.eval(a)
    after = backend.memory_counters()
    assert after is not None
    assert after.active_bytes - before.active_bytes >= 256 * 1024 * 1024
    del a
    assert backend.clear_cache() is True
    counters = backend.memory_counters()
    assert counters is not None and counters.cache_bytes == 0


def test_backend_name_and_device_info() -> None:
    assert backend.backend_name() == "cpu"
    info = backend.device_info()
    assert info is not None and "architecture" in info
    assert backend.recommended_working_set_bytes() is None  # the CPU build has no GPU working set


def test_unavailable_without_mlx() -> None:
    code = (
        "import sys; sys.modules['mlx'] = None; "
        "from metal_guard import backend; "
        "print(backend.core(), backend.memory_counters(), backend.backend_name(), backend.clear_cache())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "None", "none", "False"]


def test_loaded_core_does_not_import() -> None:
    code = "from metal_guard import backend; import sys; print(backend.loaded_core(), 'mlx.core' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "False"]
