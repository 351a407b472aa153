"""The ordering matrix on the real ``mlx_lm``, each case in a fresh interpreter.

After every sequence of install / import / uninstall, every site must hold exactly one
metal-guard wrapper (installed) or none (not installed): the defining modules, the package
attributes (``mlx_lm.generate`` is the function), ``mlx_lm.generate``'s own copy of ``load``,
``mlx_lm.server``'s aliases and the ``BatchGenerator`` methods. Cases run in parallel (each
subprocess imports mlx_lm, ~1 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("mlx_lm")

PROBE = textwrap.dedent("""
    import json, sys
    import wrapt

    def probe():
        from metal_guard.adapters.base import count_guards
        gen, utils = sys.modules["mlx_lm.generate"], sys.modules["mlx_lm.utils"]
        pkg, server = sys.modules["mlx_lm"], sys.modules["mlx_lm.server"]
        sites = {
            "mlx_lm.utils:load": (utils, "load"),
            "mlx_lm.generate:generate": (gen, "generate"),
            "mlx_lm.generate:stream_generate": (gen, "stream_generate"),
            "mlx_lm.generate:batch_generate": (gen, "batch_generate"),
            "mlx_lm.generate:load": (gen, "load"),
            "mlx_lm.generate:BatchGenerator.next": (gen, "BatchGenerator.next"),
            "mlx_lm.generate:BatchGenerator.insert": (gen, "BatchGenerator.insert"),
            "mlx_lm:generate": (pkg, "generate"),
            "mlx_lm:stream_generate": (pkg, "stream_generate"),
            "mlx_lm:batch_generate": (pkg, "batch_generate"),
            "mlx_lm:load": (pkg, "load"),
            "mlx_lm.server:stream_generate": (server, "stream_generate"),
            "mlx_lm.server:load": (server, "load"),
            "mlx_lm.server:BatchGenerator.next": (server, "BatchGenerator.next"),
        }
        return {k: count_guards(wrapt.resolve_path(m, p)[2]) for k, (m, p) in sites.items()}
""")

IMPORT = "import mlx_lm, mlx_lm.server"
INSTALL = "import metal_guard; from metal_guard import installer as mg; mg.install(adapters=['mlx_lm'])"
UNINSTALL = "from metal_guard import installer as mg; mg.uninstall()"

CASES = {
    "install-import": ([INSTALL, IMPORT], 1),
    "import-install": ([IMPORT, INSTALL], 1),
    "install-import-install": ([INSTALL, IMPORT, INSTALL], 1),
    "import-install-install": ([IMPORT, INSTALL, INSTALL], 1),
    "install-install-import": ([INSTALL, INSTALL, IMPORT], 1),
    "install-uninstall-import": ([INSTALL, UNINSTALL, IMPORT], 0),
    "import-install-uninstall": ([IMPORT, INSTALL, UNINSTALL], 0),
    "install-import-uninstall": ([INSTALL, IMPORT, UNINSTALL], 0),
    "uninstall-install-import": ([UNINSTALL, INSTALL, IMPORT], 1),
    "import-install-uninstall-install": ([IMPORT, INSTALL, UNINSTALL, INSTALL], 1),
    "install-uninstall-import-install": ([INSTALL, UNINSTALL, IMPORT, INSTALL], 1),
    "partial-import-install-import": (["import mlx_lm.utils", INSTALL, IMPORT], 1),
}


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("METALGUARD_", "MLX_SAFE_PYTHON_")) and k != "PYTHONPATH"}
    env["METALGUARD_HOME"] = str(home)
    return env


def run_case(steps: list[str], home: Path) -> dict[str, int]:
    code = PROBE + "\n".join(steps) + "\nprint(json.dumps(probe()))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=clean_env(home), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_ordering_matrix_in_fresh_interpreters(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_case, steps, tmp_path / name)
                   for name, (steps, _) in CASES.items()}
        results = {name: f.result() for name, f in futures.items()}
    failures = {}
    for name, (_, expected) in CASES.items():
        wrong = {site: n for site, n in results[name].items() if n != expected}
        if wrong:
            failures[name] = wrong
    assert failures == {}, json.dumps(failures, indent=1)


def test_install_imports_nothing_until_a_target_is_imported(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import json, sys
        before = set(sys.modules)
        import metal_guard
        metal_guard_install = __import__("metal_guard.installer", fromlist=["install"])
        report = metal_guard_install.install()
        heavy = sorted(m for m in set(sys.modules) - before
                       if m.split(".")[0] in ("wrapt", "mlx", "mlx_lm", "mlx_vlm", "numpy",
                                              "transformers", "langchain_core", "langchain_community")
                       or m.startswith("metal_guard.adapters"))
        import mlx_lm
        after = sorted(m for m in ("wrapt", "metal_guard.adapters.mlx_lm", "metal_guard.adapters.base")
                       if m in sys.modules)
        print(json.dumps({"heavy": heavy, "pending": report["adapters"]["mlx_lm"]["state"],
                          "after": after}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=clean_env(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"heavy": [], "pending": "pending",
                   "after": ["metal_guard.adapters.base", "metal_guard.adapters.mlx_lm", "wrapt"]}


def test_kill_switch_env_beats_install_in_a_fresh_interpreter(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    env["METALGUARD_DISABLED"] = "1"
    code = PROBE + INSTALL + "\n" + IMPORT + "\nprint(json.dumps(probe()))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(counts.values()) == {0}
