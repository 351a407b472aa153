"""``metal-guard check-model``, ``advisories`` and ``registry validate|list``."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from metal_guard.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, EXIT_WARN, main

GEMMA = "mlx-community/gemma-4-31b-it-8bit"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code, out, _ = run(capsys, *argv, "--json")
    return code, json.loads(out)


def test_check_model_known_panic_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check-model", "gemma-4-31b-it-8bit", "--all-families")
    assert code == EXIT_WARN
    assert GEMMA in out and "tier: panic" in out and "policy: refuse" in out
    assert "gemma-4-26b-a4b-it-4bit" in out


def test_check_model_json_and_policy(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, data = run_json(capsys, "check-model", GEMMA, "--gpu-family", "M4")
    assert code == EXIT_WARN
    assert data["advisory"]["model_id"] == GEMMA and data["gpu_family"] == "M4"
    assert all("M4" in o["gpu_family"] for o in data["advisory"]["error_classes"])
    assert data["policy"] == "refuse"
    monkeypatch.setenv("METALGUARD_MODE", "observer")
    assert run_json(capsys, "check-model", GEMMA, "--gpu-family", "M4")[1]["policy"] == "warn"


def test_check_model_other_family_and_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "check-model", GEMMA, "--gpu-family", "applegpu_g17s")
    assert code == EXIT_OK and data["known"] is True and data["advisory"] is None
    assert data["other_families"] == ["M1", "M4"]
    code, out, _ = run(capsys, "check-model", "mlx-community/Llama-3.2-1B-Instruct-4bit")
    assert code == EXIT_OK and "no known reports" in out


def test_check_model_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "check-model", GEMMA, "--gpu-family", "Z80")
    assert code == EXIT_USAGE and "Z80" in err
    assert main(["check-model"]) == EXIT_USAGE


def test_advisories_with_injected_versions(capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "advisories", "--package", "mlx=0.31.2", "--min-severity", "critical")
    assert code == EXIT_WARN
    assert data["blocked"][0]["package"] == "mlx"
    assert {a["id"] for a in data["advisories"]} >= {"mlx-3390-uncatchable-command-buffer-abort"}
    assert all(a["severity"] == "critical" for a in data["advisories"])
    code, data = run_json(capsys, "advisories", "--package", "mlx=0.32.4", "--package", "mlx-vlm=0.7.10",
                          "--package", "langchain-community=", "--min-severity", "high")
    assert code == EXIT_OK and data == {"advisories": [], "blocked": []}
    assert main(["advisories", "--package", "mlx"]) == EXIT_USAGE


def test_registry_validate_shipped_files(capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = Path(str(resources.files("metal_guard").joinpath("data")))
    code, out, _ = run(capsys, "registry", "validate", str(data_dir / "panic_registry.json"))
    assert code == EXIT_OK and "valid registry" in out
    code, data = run_json(capsys, "registry", "validate", str(data_dir / "advisories.json"))
    assert code == EXIT_OK and data["kind"] == "advisories" and data["valid"] is True


def test_registry_validate_reports_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = json.loads(resources.files("metal_guard").joinpath("data", "panic_registry.json").read_text())
    doc["models"][GEMMA]["error_classes"][0]["type"] = "kernel_panic"  # a severity, not a class
    doc["models"]["example/new-model"] = {**doc["models"][GEMMA], "tier": "abort"}
    bad = tmp_path / "contrib.json"
    bad.write_text(json.dumps(doc))
    before = bad.read_bytes()
    code, data = run_json(capsys, "registry", "validate", str(bad))
    assert code == EXIT_FAILED and data["valid"] is False
    assert any("'kernel_panic' is not a classifier class" in e for e in data["errors"])
    assert bad.read_bytes() == before  # validation never touches the file
    code, out, _ = run(capsys, "registry", "validate", str(bad))
    assert code == EXIT_FAILED and "error(s)" in out


@pytest.mark.parametrize("content", ["{not json", "[]", ""])
def test_registry_validate_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str) -> None:
    path = tmp_path / "x.json"
    path.write_text(content)
    assert run(capsys, "registry", "validate", str(path))[0] == EXIT_FAILED
    assert run(capsys, "registry", "validate", str(tmp_path / "missing.json"))[0] == EXIT_FAILED


def test_registry_list(capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "registry", "list", "--tier", "panic")
    assert code == EXIT_OK and [m["model_id"] for m in data["models"]] == [GEMMA]
    code, out, _ = run(capsys, "registry", "list", "--gpu-family", "M5")
    assert code == EXIT_OK and "Qwen3.5-9B-4bit" in out and GEMMA not in out
    assert run(capsys, "registry")[0] == EXIT_USAGE
    assert run(capsys, "registry", "list", "--gpu-family", "Z1")[0] == EXIT_USAGE


def test_check_model_does_not_import_mlx() -> None:
    code = ("import sys; from metal_guard.cli import main; rc = main(['check-model', 'kimi-k2.5', "
            "'--all-families']); print(rc, 'mlx.core' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "1 False", proc.stderr
