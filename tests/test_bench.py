"""bench.py: bench_scoped_load with real mlx_lm / mlx_vlm loads of the tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from metal_guard import memory
from metal_guard.bench import bench_scoped_load
from metal_guard.breadcrumbs import tail
from metal_guard.errors import MLXLockConflict
from metal_guard.instance import MetalGuard
from metal_guard.lock import read_mlx_lock

pytest.importorskip("mlx.core")


@pytest.fixture
def guard() -> MetalGuard:
    return MetalGuard(cooldown_secs=0.0)


def test_mlx_lm_load_generate_unload(tiny_model_path: Path, guard: MetalGuard) -> None:
    import mlx_lm

    sleeps: list[float] = []
    with bench_scoped_load(str(tiny_model_path), guard=guard, sleep=sleeps.append, cooldown_sec=8.0,
                           context_tokens=256) as (model, tokenizer):
        holder = read_mlx_lock()
        assert holder is not None and holder["pid"] == os.getpid()
        assert "bench_scoped_load" in holder["label"]
        text = mlx_lm.generate(model, tokenizer, prompt="hello", max_tokens=3)
        assert isinstance(text, str)
        del model, tokenizer
    assert read_mlx_lock() is None
    assert 8.0 in sleeps
    entry = memory.lookup_peak(str(tiny_model_path), context_tokens=256)
    assert entry is not None and entry["peak_bytes"] > 0 and entry["quantization"] == "fp32"
    tags = [(c.tag, c.payload) for c in tail(30)]
    assert any(t == "LOAD" and p.endswith("START backend=mlx_lm") for t, p in tags)
    assert any(t == "UNLOAD" for t, _ in tags)


def test_mlx_vlm_load(tiny_vlm_path: Path, guard: MetalGuard) -> None:
    with bench_scoped_load(str(tiny_vlm_path), backend="mlx-vlm", guard=guard, sleep=lambda s: None,
                           record_peak=False) as (model, processor):
        assert hasattr(model, "config") and processor is not None
        assert read_mlx_lock() is not None
        del model, processor
    assert read_mlx_lock() is None
    assert memory.ledger_entries() == []


def test_failed_load_releases_the_lock(tmp_path: Path, guard: MetalGuard) -> None:
    with pytest.raises(ValueError), bench_scoped_load(str(tmp_path / "missing-model"), guard=guard,
                                                     sleep=lambda s: None):
        pytest.fail("must not get here")
    assert read_mlx_lock() is None


def test_failing_block_records_nothing_and_releases(tiny_model_path: Path, guard: MetalGuard) -> None:
    with pytest.raises(RuntimeError, match="bench failed"), \
            bench_scoped_load(str(tiny_model_path), guard=guard, sleep=lambda s: None):
        raise RuntimeError("bench failed")
    assert read_mlx_lock() is None
    assert memory.ledger_entries() == []
    assert any(c.tag == "UNLOAD" for c in tail(10))


def test_bad_backend_touches_nothing(guard: MetalGuard) -> None:
    with pytest.raises(ValueError, match="backend"), bench_scoped_load("x", backend="torch", guard=guard):
        pass
    with pytest.raises(ValueError), bench_scoped_load("x", cooldown_sec=-1, guard=guard):
        pass
    assert read_mlx_lock() is None


def test_lock_held_elsewhere_refuses(tiny_model_path: Path, guard: MetalGuard, metalguard_home: Path) -> None:
    holder_code = (
        "import sys, time\n"
        "from metal_guard.lock import acquire_mlx_lock\n"
        "acquire_mlx_lock('other-bench')\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", holder_code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "METALGUARD_HOME": str(metalguard_home)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(MLXLockConflict), bench_scoped_load(str(tiny_model_path), guard=guard,
                                                               sleep=lambda s: None):
            pytest.fail("must not load while another process holds the lock")
    finally:
        proc.kill()
        proc.wait()
