from __future__ import annotations

import json
import subprocess
import sys

import metal_guard


def _fresh(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def test_import_is_free() -> None:
    out = _fresh(
        "import sys, json; before=set(sys.modules); import metal_guard; "
        "new=sorted(set(sys.modules)-before); print(json.dumps(new))"
    )
    new = json.loads(out)
    assert not [m for m in new if m == "mlx" or m.startswith(("mlx.", "mlx_", "wrapt", "psutil", "filelock", "platformdirs"))], new
    assert [m for m in new if m.startswith("metal_guard")] == ["metal_guard", "metal_guard._version"]


def test_import_does_no_io_or_env_changes() -> None:
    out = _fresh(
        "import os, json; before=dict(os.environ); import metal_guard; "
        "print(json.dumps(dict(os.environ)==before))"
    )
    assert json.loads(out) is True


def test_every_public_name_resolves() -> None:
    for name in metal_guard.__all__:
        assert getattr(metal_guard, name) is not None, name


def test_unknown_attribute() -> None:
    import pytest

    with pytest.raises(AttributeError):
        metal_guard.no_such_thing  # noqa: B018


def test_version() -> None:
    from importlib.metadata import version

    assert metal_guard.__version__ == version("metal-guard")
