"""Zero-code activation, tested on the BUILT WHEEL in a fresh virtual environment.

The module fixture builds the wheel from the working tree (``pip wheel --no-build-isolation``),
creates a venv from the base interpreter (``--without-pip``), and installs the wheel into it with
the dev venv's pip (``pip --python <venv> install --no-deps``) — so the ``.pth``, ``.start`` and
boot module land at the top of site-packages exactly as a user's ``pip install`` puts them.
metal-guard's dependencies (wrapt, MLX, mlx-lm ...) are not re-downloaded: one extra file,
``zz_dev_deps.pth``, appends the dev venv's site-packages to ``sys.path``. It sorts after
``metal_guard-autoload.pth``, so wrapt is *not* importable yet when our ``.pth`` line runs — the
situation the deferred activation exists for. The dev venv's editable metal-guard is not
visible there (its own ``.pth`` files are not processed for a plain path entry), and a test
asserts that ``metal_guard`` is imported from the venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 180,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("METALGUARD_", "MLX_SAFE_PYTHON_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["METALGUARD_HOME"] = str(home)
    env.update(extra)
    return env


class Venv:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = root / "bin" / "python"
        out = _run([str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        self.site = Path(out.stdout.strip())

    def py(self, code: str, home: Path, *flags: str, **env: str) -> subprocess.CompletedProcess[str]:
        # cwd outside the repository: "" on sys.path must not find the working tree's package
        home.mkdir(parents=True, exist_ok=True)
        return _run([str(self.python), *flags, "-c", textwrap.dedent(code)], clean_env(home, **env),
                    cwd=home)

    def json(self, code: str, home: Path, **env: str) -> dict:
        proc = self.py(code, home, **env)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def build_wheel_venv(base: Path) -> Venv:
    """Build the wheel from the working tree and install it into a fresh venv under ``base``."""
    build = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(base / "dist"), "-q"]
    try:
        import hatchling  # noqa: F401

        build.insert(5, "--no-build-isolation")
    except ImportError:  # pragma: no cover - pip then fetches hatchling from the index
        pass
    proc = _run(build)
    assert proc.returncode == 0, proc.stderr
    wheel = next((base / "dist").glob("metal_guard-*.whl"))
    proc = _run([sys._base_executable, "-m", "venv", "--without-pip", str(base / "venv")])  # type: ignore[attr-defined]
    assert proc.returncode == 0, proc.stderr
    env = Venv(base / "venv")
    proc = _run([sys.executable, "-m", "pip", "--python", str(env.python), "install", "--no-deps",
                 "--no-index", "-q", str(wheel)])
    assert proc.returncode == 0, proc.stderr
    (env.site / "zz_dev_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env


@pytest.fixture(scope="module")
def venv(wheel_venv: Venv) -> Venv:
    """The session's wheel venv (``wheel_venv`` in conftest.py, built by the function above)."""
    return wheel_venv


MODULES = """
    import json, sys
    print(json.dumps({
        "boot": "_metal_guard_boot" in sys.modules,
        "ours": sorted(m for m in sys.modules if m.startswith("metal_guard")),
        "heavy": sorted(m for m in ("wrapt", "mlx", "mlx_lm") if m in sys.modules),
        "trigger": any("autoload trigger" in repr(f) for f in sys.meta_path),
    }))
"""

GUARDED = """
    import json, sys
    import mlx_lm, mlx_lm.server
    import metal_guard
    from metal_guard import installer as mg
    from metal_guard.adapters.base import count_guards
    r = mg.adapter_report()
    print(json.dumps({
        "installed": r["installed"], "source": r["source"], "state": r["adapters"]["mlx_lm"]["state"],
        "counts": [count_guards(x) for x in (mlx_lm.generate, mlx_lm.load, mlx_lm.server.stream_generate,
                                             vars(sys.modules["mlx_lm.generate"])["stream_generate"])],
        "from_venv": metal_guard.__file__.startswith(sys.prefix),
    }))
"""


def test_wheel_ships_the_startup_files(venv: Venv) -> None:
    assert (venv.site / "_metal_guard_boot.py").is_file()
    assert (venv.site / "metal_guard-autoload.pth").read_text() == "import _metal_guard_boot; _metal_guard_boot.init()\n"
    assert (venv.site / "metal_guard-autoload.start").read_text().strip() == "_metal_guard_boot:init"
    eps = next(venv.site.glob("metal_guard-*.dist-info")) / "entry_points.txt"
    text = eps.read_text()
    assert "[pytest11]" in text and "metal_guard = metal_guard.pytest_plugin" in text
    assert "metal-guard = metal_guard.cli:main" in text


@pytest.mark.parametrize("value", [None, "", "0", "false", "no"])
def test_off_imports_only_the_boot_module(venv: Venv, tmp_path: Path, value: str | None) -> None:
    extra = {} if value is None else {"METALGUARD_AUTOLOAD": value}
    out = venv.json(MODULES, tmp_path, **extra)
    assert out == {"boot": True, "ours": [], "heavy": [], "trigger": False}


def test_on_waits_for_a_target_import_then_guards_it(venv: Venv, tmp_path: Path) -> None:
    out = venv.json(MODULES, tmp_path, METALGUARD_AUTOLOAD="1")
    assert out == {"boot": True, "ours": [], "heavy": [], "trigger": True}
    out = venv.json(GUARDED, tmp_path, METALGUARD_AUTOLOAD="1", METALGUARD_ADAPTERS="mlx_lm")
    assert out == {"installed": True, "source": "autoload", "state": "patched",
                   "counts": [1, 1, 1, 1], "from_venv": True}


def test_autoload_info_reports_the_pth(venv: Venv, tmp_path: Path) -> None:
    code = "import json; from metal_guard.autoload import autoload_info; print(json.dumps(autoload_info()))"
    out = venv.json(code, tmp_path, METALGUARD_AUTOLOAD="1")
    assert out["pth_installed"] is True and out["requested"] is True and out["boot_ran"] is True
    assert out["boot_module"] == str(venv.site / "_metal_guard_boot.py")


def test_dash_s_disables_autoload(venv: Venv, tmp_path: Path) -> None:
    proc = venv.py("import sys; print('_metal_guard_boot' in sys.modules)", tmp_path, "-S",
                   METALGUARD_AUTOLOAD="1")
    assert proc.stdout.strip() == "False"


def test_kill_switch_beats_autoload(venv: Venv, tmp_path: Path) -> None:
    out = venv.json(GUARDED, tmp_path, METALGUARD_AUTOLOAD="1", METALGUARD_DISABLED="1")
    assert out["installed"] is False and out["counts"] == [0, 0, 0, 0]


def test_broken_configuration_never_breaks_start_up(venv: Venv, tmp_path: Path) -> None:
    proc = venv.py("import mlx_lm; print('still running')", tmp_path, METALGUARD_AUTOLOAD="1",
                   METALGUARD_STRICT="maybe")
    assert proc.returncode == 0 and proc.stdout.strip() == "still running"
    assert "metal-guard autoload" in proc.stderr and "METALGUARD_STRICT" in proc.stderr


def test_target_imported_during_site_start_up_is_still_guarded(venv: Venv, tmp_path: Path) -> None:
    custom = venv.site / "sitecustomize.py"
    custom.write_text("import mlx_lm\n")
    try:
        out = venv.json(GUARDED, tmp_path, METALGUARD_AUTOLOAD="1", METALGUARD_ADAPTERS="mlx_lm")
    finally:
        custom.unlink()
    assert out["installed"] is True and out["counts"] == [1, 1, 1, 1]


def test_metal_guard_run_uses_the_pth(venv: Venv, tmp_path: Path) -> None:
    code = GUARDED.replace('"from_venv"', '"pythonpath": __import__("os").environ.get("PYTHONPATH"), "from_venv"')
    proc = _run([str(venv.root / "bin" / "metal-guard"), "run", "--adapters", "mlx_lm", "--",
                 str(venv.python), "-c", textwrap.dedent(code)], clean_env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["installed"] is True and out["counts"] == [1, 1, 1, 1]
    assert out["pythonpath"] is None  # no sitecustomize shim needed: the .pth did it


def test_boot_triggers_match_the_registry() -> None:
    import importlib.util

    from metal_guard.installer import REGISTRY

    path = ROOT / "metal_guard" / "autoload" / "startup" / "_metal_guard_boot.py"
    spec = importlib.util.spec_from_file_location("_boot_under_test", path)
    assert spec is not None and spec.loader is not None
    boot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(boot)
    tops = {t.split(".")[0] for info in REGISTRY.values() for t in info.triggers}
    assert tops == boot.TRIGGERS


def test_sitecustomize_shim_activates_and_chains_the_users(tmp_path: Path) -> None:
    """The editable/dev install has no .pth: ``metal-guard run`` falls back to the shim, which
    must still run the user's own sitecustomize."""
    user = tmp_path / "user_site"
    user.mkdir()
    (user / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE_RAN'] = '1'\n")
    code = textwrap.dedent("""
        import json, os, sys
        import mlx_lm
        from metal_guard import installer as mg
        print(json.dumps({"user": os.environ.get("USER_SITECUSTOMIZE_RAN"),
                          "installed": mg.is_installed(), "source": mg.adapter_report()["source"]}))
    """)
    metal_guard_cli = shutil.which("metal-guard", path=str(Path(sys.executable).parent))
    assert metal_guard_cli is not None
    env = clean_env(tmp_path / "home", PYTHONPATH=str(user), METALGUARD_ADAPTERS="mlx_lm")
    proc = _run([metal_guard_cli, "run", "--sitecustomize", "--", sys.executable, "-c", code], env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"user": "1", "installed": True, "source": "autoload"}


def test_run_without_a_command_is_a_usage_error(tmp_path: Path) -> None:
    from metal_guard.cli import EXIT_USAGE, main

    assert main(["run"]) == EXIT_USAGE
    assert main(["run", "--", "definitely-not-a-command-xyz"]) == 127
