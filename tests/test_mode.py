"""mode.py: posture and process-mode defaults, and proof that the defaults are used."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from metal_guard import mode
from metal_guard.errors import MetalOOMError
from metal_guard.prefill import KVGrowthTracker, ModelDims, require_prefill_fit
from metal_guard.settings import PROCESS_MODES

DATA = Path(mode.__file__).parent / "data" / "process_modes.json"


def test_posture_from_env(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    assert mode.current_mode() == "defensive" and mode.is_defensive() and not mode.is_observer()
    monkeypatch.setenv("METALGUARD_MODE", "OBSERVER")
    assert mode.current_mode() == "observer" and mode.is_observer()
    d = mode.describe_mode()
    assert d["mode"] == "observer" and d["env_var"] == "METALGUARD_MODE" and d["from_env"] is True
    assert "record" in d["description"]
    monkeypatch.setenv("METALGUARD_MODE", "yolo")
    with caplog.at_level(logging.WARNING):
        assert mode.current_mode() == "defensive"
    assert any("yolo" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("argv", "modules", "expected"),
    [
        (["/usr/bin/python3", "-m", "mlx_lm.server", "--model", "x"], {}, "server"),
        (["/venv/bin/mlx_lm.server", "--port", "8080"], {}, "server"),
        (["/venv/lib/python3.11/site-packages/mlx_lm/server.py", "--model", "m"], {}, "server"),
        (["/venv/lib/python3.11/site-packages/uvicorn/__main__.py", "app:app"], {}, "server"),
        (["/venv/lib/python3.11/site-packages/mlx_lm/generate.py", "--prompt", "hi"], {}, "cli"),
        (["/venv/bin/uvicorn", "app:app"], {}, "server"),
        (["/venv/bin/gunicorn", "-k", "uvicorn.workers.UvicornWorker", "app:app"], {}, "server"),
        (["python", "-m", "hypercorn", "app:app"], {}, "server"),
        (["/venv/lib/ipykernel_launcher.py", "-f", "kernel.json"], {}, "notebook"),
        (["app.py"], {"ipykernel": object()}, "notebook"),
        (["/venv/bin/pytest", "-q"], {}, "cli"),
        (["bench.py", "--n", "3"], {}, "cli"),
        (["-c"], {}, "cli"),
        (["/Applications/MyApp.app/Contents/MacOS/MyApp"], {}, "embedded"),
        ([], {}, "embedded"),
    ],
)
def test_detect_process_mode(argv: list[str], modules: dict[str, object], expected: str) -> None:
    assert mode.detect_process_mode(argv=argv, modules=modules) == expected


def test_forced_and_worker_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_SUBPROCESS_WORKER", "1")
    assert mode.detect_process_mode(argv=["/venv/bin/uvicorn"]) == "subprocess_worker"
    assert mode.describe_process_mode()["source"] == "METALGUARD_SUBPROCESS_WORKER"
    monkeypatch.setenv("METALGUARD_PROCESS_MODE", "notebook")
    assert mode.detect_process_mode(argv=["/venv/bin/uvicorn"]) == "notebook"
    described = mode.describe_process_mode()
    assert described["source"] == "METALGUARD_PROCESS_MODE"
    assert described["defaults"]["periodic_flush_interval_sec"] == 900.0


def test_mode_table_values_and_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    data = json.loads(DATA.read_text())
    row = {"type": "object", "additionalProperties": False,
           "required": ["generate_timeout_sec", "periodic_flush_interval_sec", "kv_ceiling_gb",
                        "prefill_single_alloc_ceiling_gb", "skip_process_lock", "description"],
           "properties": {"generate_timeout_sec": {"type": "number", "exclusiveMinimum": 0},
                          "periodic_flush_interval_sec": {"type": "number", "exclusiveMinimum": 0},
                          "kv_ceiling_gb": {"type": "number", "exclusiveMinimum": 0},
                          "prefill_single_alloc_ceiling_gb": {"type": "number", "exclusiveMinimum": 0},
                          "skip_process_lock": {"type": "boolean"}, "description": {"type": "string"}}}
    schema = {"type": "object", "required": ["schema_version", "modes"],
              "properties": {"schema_version": {"const": 1},
                             "modes": {"type": "object", "additionalProperties": row,
                                       "required": list(PROCESS_MODES)}}}
    jsonschema.validate(data, schema)
    server = mode.apply_mode_defaults("server")
    assert (server["generate_timeout_sec"], server["periodic_flush_interval_sec"], server["kv_ceiling_gb"],
            server["prefill_single_alloc_ceiling_gb"]) == (60.0, 60.0, 10.0, 4.0)
    assert mode.apply_mode_defaults("subprocess_worker")["skip_process_lock"] is True
    assert mode.apply_mode_defaults()["mode"] == "cli"  # under pytest
    with pytest.raises(ValueError):
        mode.apply_mode_defaults("daemon")


def test_mode_default_prefers_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_PROCESS_MODE", "embedded")
    assert mode.mode_default("generate_timeout_sec") == 120.0
    assert mode.mode_default("generate_timeout_sec", 7) == 7
    with pytest.raises(KeyError):
        mode.mode_default("nope")


def test_process_mode_ceilings_are_really_used(monkeypatch: pytest.MonkeyPatch) -> None:
    dims = ModelDims(n_layers=1, n_heads=1, n_kv_heads=1, head_dim=1, dtype_bytes=1)
    ctx = 67_000  # scores: 67000^2 B = 4.49 GB — over server's 4.0, under cli's 5.0
    monkeypatch.setenv("METALGUARD_PROCESS_MODE", "cli")
    assert require_prefill_fit(context_tokens=ctx, dims=dims, available_gb=None) == pytest.approx(4.489, abs=1e-3)
    monkeypatch.setenv("METALGUARD_PROCESS_MODE", "server")
    with pytest.raises(MetalOOMError, match=r"ceiling 4\.00GB"):
        require_prefill_fit(context_tokens=ctx, dims=dims, available_gb=None)
    tracker = KVGrowthTracker()
    assert tracker.start("r1")["ceiling_gb"] == 10.0
    monkeypatch.setenv("METALGUARD_PROCESS_MODE", "notebook")
    assert tracker.start("r2")["ceiling_gb"] == 30.0
    assert KVGrowthTracker(ceiling_gb=2.0).start("r3")["ceiling_gb"] == 2.0
