"""The mlx_vlm adapter on the real library and the tiny local VLM (CPU MLX, one real image)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

mlx_vlm = pytest.importorskip("mlx_vlm")

from metal_guard import installer as mg  # noqa: E402
from metal_guard.adapters.base import count_guards  # noqa: E402
from metal_guard.breadcrumbs import tail  # noqa: E402
from metal_guard.errors import MetalOOMError, ModelDoesNotFitError  # noqa: E402
from metal_guard.resources import global_resource_tracker  # noqa: E402

OOM_TEXT = ("[METAL] Command buffer execution failed: Insufficient Memory "
            "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory).")


def _prompt(model: Any, processor: Any) -> str:
    from mlx_vlm.prompt_utils import apply_chat_template

    return str(apply_chat_template(processor, model.config, "describe this image", num_images=1))


@pytest.fixture(scope="module")
def raw(tiny_vlm_path: Path, tiny_image_path: Path) -> dict[str, Any]:
    """Unguarded reference outputs."""
    assert not mg.is_installed()
    model, processor = mlx_vlm.load(str(tiny_vlm_path))
    prompt = _prompt(model, processor)
    result = mlx_vlm.generate(model, processor, prompt, image=[str(tiny_image_path)], max_tokens=6)
    stream = [r.text for r in mlx_vlm.stream_generate(model, processor, prompt,
                                                      image=[str(tiny_image_path)], max_tokens=6)]
    return {"text": result.text, "stream": stream}


@pytest.fixture
def guarded() -> Iterator[dict[str, Any]]:
    report = mg.install(adapters=["mlx_vlm"], cadence=False)
    try:
        yield report
    finally:
        mg.uninstall()


def test_every_site_is_guarded_once_and_released_by_uninstall(guarded: dict[str, Any]) -> None:
    row = mg.adapter_report()["adapters"]["mlx_vlm"]
    assert row["state"] == "patched", row
    dispatch = sys.modules["mlx_vlm.generate.dispatch"]
    package = sys.modules["mlx_vlm.generate"]
    for obj in (mlx_vlm.load, mlx_vlm.generate, mlx_vlm.stream_generate, dispatch.generate,
                dispatch.stream_generate, package.generate, package.stream_generate,
                sys.modules["mlx_vlm.utils"].load):
        assert count_guards(obj) == 1, obj
    mg.uninstall()
    assert count_guards(mlx_vlm.generate) == 0 and count_guards(mlx_vlm.load) == 0
    assert count_guards(dispatch.stream_generate) == 0


def test_guarded_load_generate_stream_match_unguarded(raw: dict[str, Any], guarded: dict[str, Any],
                                                      tiny_vlm_path: Path, tiny_image_path: Path) -> None:
    tracker = global_resource_tracker()
    model, processor = mlx_vlm.load(str(tiny_vlm_path))
    loads = [c for c in tail(50) if c.tag == "LOAD"]
    assert [c.payload for c in loads[-2:]] == ["START", "DONE"]
    assert loads[-1].meta["model"] == str(tiny_vlm_path)

    prompt = _prompt(model, processor)
    before = tracker.count
    result = mlx_vlm.generate(model, processor, prompt, image=[str(tiny_image_path)], max_tokens=6)
    assert result.text == raw["text"] and result.generation_tokens == 6
    assert tracker.count == before + 1  # generate -> stream_generate counted once

    stream = [r.text for r in mlx_vlm.stream_generate(model, processor, prompt,
                                                      image=[str(tiny_image_path)], max_tokens=6)]
    assert stream == raw["stream"]
    assert tracker.count == before + 2


def test_oom_in_vlm_generation_becomes_metal_oom_error(guarded: dict[str, Any], tiny_vlm_path: Path,
                                                       tiny_image_path: Path) -> None:
    model, processor = mlx_vlm.load(str(tiny_vlm_path))
    prompt = _prompt(model, processor)

    def failing_sampler(logprobs: Any) -> Any:
        raise RuntimeError(OOM_TEXT)

    with pytest.raises(MetalOOMError) as info:
        mlx_vlm.generate(model, processor, prompt, image=[str(tiny_image_path)], max_tokens=4,
                         sampler=failing_sampler)
    assert info.value.error_class is not None and info.value.error_class.kind == "oom"
    assert isinstance(info.value.__cause__, RuntimeError)
    assert any(c.tag == "OOM_RECOVERY" for c in tail(20))
    # the streamed path too, and the model keeps working afterwards
    with pytest.raises(MetalOOMError):
        for _ in mlx_vlm.stream_generate(model, processor, prompt, image=[str(tiny_image_path)],
                                         max_tokens=4, sampler=failing_sampler):
            pass
    ok = mlx_vlm.generate(model, processor, prompt, image=[str(tiny_image_path)], max_tokens=2)
    assert ok.generation_tokens == 2


def test_fit_check_refuses_a_vlm_that_does_not_fit(monkeypatch: pytest.MonkeyPatch,
                                                   guarded: dict[str, Any], tiny_vlm_path: Path) -> None:
    from metal_guard import memory

    real = memory.memory_stats

    def tight(*, load: bool = True) -> Any:
        stats = real(load=load)
        return memory.MemoryStats(**{**{f: getattr(stats, f) for f in stats.__dataclass_fields__},
                                     "limit_bytes": 1000, "active_bytes": 900, "footprint_bytes": 900,
                                     "limit_source": "test"})

    monkeypatch.setattr(memory, "memory_stats", tight)
    with pytest.raises(ModelDoesNotFitError):
        mlx_vlm.load(str(tiny_vlm_path))


def test_install_before_import_in_a_fresh_interpreter(tiny_vlm_path: Path, tiny_image_path: Path) -> None:
    code = textwrap.dedent(f"""
        import json, sys
        from metal_guard import installer as mg
        mg.install(adapters=["mlx_vlm"], cadence=False)
        assert "mlx_vlm" not in sys.modules and "wrapt" not in sys.modules
        import mlx_vlm
        from mlx_vlm.prompt_utils import apply_chat_template
        from metal_guard.adapters.base import count_guards
        from metal_guard.resources import global_resource_tracker
        model, processor = mlx_vlm.load({str(tiny_vlm_path)!r})
        prompt = apply_chat_template(processor, model.config, "hi", num_images=1)
        out = mlx_vlm.generate(model, processor, prompt, image=[{str(tiny_image_path)!r}], max_tokens=3)
        print(json.dumps({{"counts": [count_guards(mlx_vlm.load), count_guards(mlx_vlm.generate),
                                      count_guards(mlx_vlm.stream_generate)],
                          "tokens": out.generation_tokens,
                          "inferences": global_resource_tracker().count,
                          "state": mg.adapter_report()["adapters"]["mlx_vlm"]["state"]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"counts": [1, 1, 1], "tokens": 3, "inferences": 1, "state": "patched"}
