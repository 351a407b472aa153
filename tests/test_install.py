"""install()/uninstall() mechanics on a small fake library with mlx_lm's layout (in-process).

``fakelm`` copies the shapes that matter: the package re-exports names from its submodules
(``fakelm.generate`` the attribute is the function, shadowing the module), ``generate`` iterates
the generator ``stream_generate``, and ``fakelm.server`` binds aliases at import. Its adapter
module is written next to it and registered for the test. The real-library ordering matrix in
fresh interpreters is in ``test_install_matrix.py``.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import wrapt

from metal_guard import _import_hooks
from metal_guard import installer as mg
from metal_guard.adapters.base import count_guards, find_guard
from metal_guard.errors import AdapterError, SettingsError

FAKE_FILES = {
    "fakelm/__init__.py": """
        from .generate import BatchGen, generate, stream_generate
        from .utils import load
    """,
    "fakelm/utils.py": """
        def load(path):
            return ("model:" + str(path), "tok")
    """,
    "fakelm/generate.py": """
        from .utils import load

        def stream_generate(model, tok, prompt, n=3):
            for i in range(n):
                got = yield f"{prompt}{i}"
                if got is not None:
                    yield f"sent:{got}"
            return "finished"

        def generate(model, tok, prompt, n=3):
            return "".join(stream_generate(model, tok, prompt, n))

        class BatchGen:
            def next(self):
                return "step"
    """,
    "fakelm/server.py": """
        from .generate import stream_generate
        from .utils import load
    """,
    "fakelm_adapter.py": """
        from metal_guard.adapters.base import Target

        TARGETS = (
            Target("fakelm.utils", "load", "load"),
            Target("fakelm.generate", "generate", "generate"),
            Target("fakelm.generate", "stream_generate", "generate"),
            Target("fakelm.generate", "BatchGen.next", "step"),
        )
        patched = []

        def on_patched(module):
            patched.append(module.__name__)
    """,
}
FAKE_INFO = mg.AdapterInfo("fakelm", "fakelm_adapter", ("fakelm.utils", "fakelm.generate"), ("fakelm",))
NO_LOAD_CHECKS = {"cadence": False, "fit_check": False}


def _purge() -> None:
    for name in [m for m in sys.modules if m == "fakelm" or m.startswith(("fakelm.", "fakelm_"))]:
        del sys.modules[name]


@pytest.fixture
def fakelm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for rel, body in FAKE_FILES.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    _purge()
    importlib.invalidate_caches()
    mg.register_adapter(FAKE_INFO, replace=True)
    yield tmp_path
    mg.uninstall()
    mg.REGISTRY.pop("fakelm", None)
    _purge()


def install_fake(**kw: object) -> dict:
    return mg.install(adapters=["fakelm"], **{**NO_LOAD_CHECKS, **kw})  # type: ignore[arg-type]


def sites() -> dict[str, int]:
    """metal-guard wrappers at every site of the fake library (``-1`` = module not imported)."""
    out: dict[str, int] = {}
    gen, utils = sys.modules.get("fakelm.generate"), sys.modules.get("fakelm.utils")
    pkg, server = sys.modules.get("fakelm"), sys.modules.get("fakelm.server")
    for label, module, path in (
        ("utils:load", utils, "load"), ("generate:generate", gen, "generate"),
        ("generate:stream_generate", gen, "stream_generate"), ("generate:load", gen, "load"),
        ("generate:BatchGen.next", gen, "BatchGen.next"), ("pkg:generate", pkg, "generate"),
        ("pkg:stream_generate", pkg, "stream_generate"), ("pkg:load", pkg, "load"),
        ("server:stream_generate", server, "stream_generate"), ("server:load", server, "load"),
    ):
        out[label] = -1 if module is None else count_guards(wrapt.resolve_path(module, path)[2])
    return out


def _all(value: int) -> dict[str, int]:
    return dict.fromkeys(sites(), value)


# --------------------------------------------------------------------------- ordering


def test_install_before_import_wraps_every_site_once(fakelm: Path) -> None:
    report = install_fake()
    assert report["adapters"]["fakelm"]["state"] == "pending"
    assert "fakelm" not in sys.modules and "fakelm_adapter" not in sys.modules
    import fakelm.server  # noqa: F401

    assert sites() == _all(1)
    report = mg.adapter_report()["adapters"]["fakelm"]
    assert report["state"] == "patched"
    assert report["sites"] == ["fakelm.generate:BatchGen.next", "fakelm.generate:generate",
                               "fakelm.generate:stream_generate", "fakelm.utils:load"]
    assert sys.modules["fakelm_adapter"].patched == ["fakelm.utils", "fakelm.generate"]


def test_install_after_import_rebinds_package_aliases(fakelm: Path) -> None:
    import fakelm.server  # noqa: F401

    assert sites() == _all(0)
    report = install_fake()
    assert sites() == _all(1)
    aliases = report["adapters"]["fakelm"]["aliases"]
    assert {"fakelm:generate", "fakelm:load", "fakelm.server:stream_generate",
            "fakelm.server:load", "fakelm.generate:load"} <= set(aliases)


def test_double_install_leaves_one_wrapper(fakelm: Path) -> None:
    install_fake()
    import fakelm.server  # noqa: F401

    install_fake()
    assert sites() == _all(1)
    mg.uninstall()
    install_fake()
    install_fake()
    assert sites() == _all(1)


def test_install_uninstall_then_import_wraps_nothing(fakelm: Path) -> None:
    install_fake()
    assert mg.uninstall() is True
    assert mg.uninstall() is False
    assert _import_hooks.watched() == [] and not _import_hooks.is_watching()
    import fakelm.server  # noqa: F401

    assert sites() == _all(0)


def test_uninstall_restores_every_site_and_reinstall_works(fakelm: Path) -> None:
    import fakelm.server  # noqa: F401

    original = sys.modules["fakelm.generate"].generate
    install_fake()
    mg.uninstall()
    assert sites() == _all(0)
    assert sys.modules["fakelm"].generate is original
    assert sys.modules["fakelm.server"].stream_generate is sys.modules["fakelm.generate"].stream_generate
    install_fake()
    assert sites() == _all(1)


def test_partial_import_then_install_then_rest(fakelm: Path) -> None:
    import fakelm.utils

    install_fake()
    import fakelm.server  # noqa: F401

    assert sites() == _all(1)


def test_reload_is_rewrapped(fakelm: Path) -> None:
    install_fake()
    import fakelm.generate  # noqa: F401

    importlib.reload(sys.modules["fakelm.generate"])
    assert count_guards(vars(sys.modules["fakelm.generate"])["generate"]) == 1


# --------------------------------------------------------------------------- wrappers


def test_foreign_wrapt_wrapper_on_top_survives_uninstall(fakelm: Path) -> None:
    import fakelm  # noqa: F401

    install_fake()
    module = sys.modules["fakelm.generate"]

    def foreign(wrapped, instance, args, kwargs):  # type: ignore[no-untyped-def]
        return "foreign:" + wrapped(*args, **kwargs)

    wrapt.wrap_function_wrapper(module, "generate", foreign)
    chain = list(wrapt.wrapper_chain(vars(module)["generate"]))
    assert len(chain) == 3 and count_guards(chain[0]) == 1
    install_fake()  # finds ours under the foreign one: still one
    assert count_guards(vars(module)["generate"]) == 1
    mg.uninstall()
    current = vars(module)["generate"]
    assert len(list(wrapt.wrapper_chain(current))) == 2
    assert count_guards(current) == 0
    assert current(None, None, "p", 2) == "foreign:p0p1"


def test_non_wrapt_wrapper_on_top_leaves_ours_inert(fakelm: Path, caplog: pytest.LogCaptureFixture) -> None:
    import functools

    import fakelm  # noqa: F401

    install_fake()
    module = sys.modules["fakelm.generate"]
    inner = vars(module)["generate"]

    @functools.wraps(inner)
    def closure(*args, **kwargs):  # type: ignore[no-untyped-def]
        return inner(*args, **kwargs)

    module.generate = closure
    assert mg.uninstall() is True
    assert "cannot remove" in caplog.text
    assert find_guard(vars(module)["generate"]) is not None  # still there ...
    from metal_guard.resources import global_resource_tracker

    before = global_resource_tracker().count
    assert module.generate(None, None, "x", 1) == "x0"
    assert global_resource_tracker().count == before  # ... but inert


def test_user_alias_needs_rebind_aliases(fakelm: Path, tmp_path: Path) -> None:
    (tmp_path / "fake_user.py").write_text("from fakelm import generate\n")
    import fake_user

    install_fake()
    assert count_guards(fake_user.generate) == 0
    mg.uninstall()
    install_fake(rebind_aliases=True)
    assert count_guards(fake_user.generate) == 1
    mg.uninstall()
    assert count_guards(fake_user.generate) == 0
    sys.modules.pop("fake_user", None)


def test_sixteen_threads_racing_install(fakelm: Path) -> None:
    import fakelm.server  # noqa: F401

    barrier = threading.Barrier(16)
    errors: list[BaseException] = []

    def racer() -> None:
        try:
            barrier.wait()
            install_fake()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=racer) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sites() == _all(1)


def test_sixteen_threads_racing_install_and_import(fakelm: Path) -> None:
    barrier = threading.Barrier(16)

    def racer(i: int) -> None:
        barrier.wait()
        if i % 2:
            install_fake()
        else:
            importlib.import_module("fakelm.server")

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sites() == _all(1)


# --------------------------------------------------------------------------- configuration


def test_kill_switch_beats_install(fakelm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_DISABLED", "1")
    report = install_fake()
    assert report.installed is False and "kill switch" in report.note
    assert not mg.is_installed() and _import_hooks.watched() == []
    import fakelm.server  # noqa: F401

    assert sites() == _all(0)


def test_adapters_from_env_and_disable_list(fakelm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_DISABLED_ADAPTERS", "fakelm")
    report = mg.install(**NO_LOAD_CHECKS)
    assert report["adapters"]["fakelm"]["state"] == "disabled"
    import fakelm  # noqa: F401

    assert sites()["generate:generate"] == 0
    mg.uninstall()
    monkeypatch.setenv("METALGUARD_DISABLED_ADAPTERS", "*")
    report = mg.install(**NO_LOAD_CHECKS)
    assert {a["state"] for a in report["adapters"].values()} == {"disabled"}
    mg.uninstall()
    monkeypatch.delenv("METALGUARD_DISABLED_ADAPTERS")
    monkeypatch.setenv("METALGUARD_ADAPTERS", "fakelm")
    report = mg.install(**NO_LOAD_CHECKS)
    assert report["adapters"]["fakelm"]["state"] == "patched"
    assert report["adapters"]["mlx_lm"]["state"] == "disabled"


def test_kwargs_beat_env_for_selection(fakelm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALGUARD_ADAPTERS", "mlx_lm")
    report = install_fake()
    assert report["adapters"]["fakelm"]["state"] == "pending"
    assert report["adapters"]["mlx_lm"]["state"] == "disabled"


def test_unknown_adapter_and_unknown_keyword_are_errors(fakelm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="nope"):
        mg.install(adapters=["nope"])
    with pytest.raises(TypeError, match="no_such_option"):
        mg.install(no_such_option=1)
    monkeypatch.setenv("METALGUARD_ADAPTERS", "mlx_lm,nope")
    with pytest.raises(SettingsError, match="METALGUARD_ADAPTERS"):
        mg.install()
    assert not mg.is_installed()


def test_second_install_with_other_options_warns(fakelm: Path) -> None:
    install_fake()
    with pytest.warns(RuntimeWarning, match="already installed"):
        install_fake(flush_every_n=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mg.install()  # no options: a plain "make sure it is installed"


def _move_target(tmp: Path) -> None:
    path = tmp / "fakelm/generate.py"
    path.write_text(path.read_text().replace("def stream_generate(", "def stream_generate_v2("))
    path.write_text(path.read_text().replace("stream_generate(model", "stream_generate_v2(model"))
    init = tmp / "fakelm/__init__.py"
    init.write_text(init.read_text().replace("stream_generate", "stream_generate_v2"))
    server = tmp / "fakelm/server.py"
    server.write_text(server.read_text().replace("stream_generate", "stream_generate_v2"))


def test_moved_target_degrades_with_a_warning(fakelm: Path) -> None:
    _move_target(fakelm)
    install_fake()
    with pytest.warns(RuntimeWarning, match="degraded"):
        import fakelm
    report = mg.adapter_report()["adapters"]["fakelm"]
    assert report["state"] == "degraded"
    assert report["missing"] == ["fakelm.generate:stream_generate (PathResolutionError)"]
    assert count_guards(vars(sys.modules["fakelm.generate"])["generate"]) == 1


def test_moved_target_strict_raises_and_rolls_back(fakelm: Path) -> None:
    _move_target(fakelm)
    import fakelm

    with pytest.raises(AdapterError, match="stream_generate"):
        install_fake(strict=True)
    assert not mg.is_installed()
    assert count_guards(vars(sys.modules["fakelm.generate"])["generate"]) == 0


def test_strict_from_env_raises_at_import(fakelm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _move_target(fakelm)
    monkeypatch.setenv("METALGUARD_STRICT", "1")
    install_fake()
    with pytest.raises(AdapterError):
        import fakelm
    assert not mg.is_installed()


def test_broken_adapter_module_is_failed_not_fatal(fakelm: Path) -> None:
    (fakelm / "fakelm_adapter.py").write_text("raise ImportError('adapter broke')\n")
    install_fake()
    with pytest.warns(RuntimeWarning, match="adapter broke"):
        import fakelm
    assert mg.adapter_report()["adapters"]["fakelm"]["state"] == "failed"
    assert sites()["generate:generate"] == 0


def test_stale_hook_does_nothing_after_uninstall(fakelm: Path) -> None:
    install_fake()
    gen = mg._state.generation  # type: ignore[union-attr]
    mg.uninstall()
    import fakelm.server  # noqa: F401

    mg._on_import("fakelm", gen, sys.modules["fakelm.generate"])  # a hook that was mid-flight
    assert sites() == _all(0)


def test_report_when_not_installed() -> None:
    report = mg.adapter_report()
    assert report["installed"] is False
    assert set(report["adapters"]) >= {"mlx_lm", "mlx_lm_server", "mlx_vlm", "langchain"}
    assert all(a["state"] == "disabled" for a in report["adapters"].values())


def test_registry_triggers_match_adapter_targets() -> None:
    """Every trigger is a module some target lives in, and vice versa (for shipped adapters)."""
    from metal_guard.adapters import mlx_lm as adapter

    assert set(mg.REGISTRY["mlx_lm"].triggers) == {t.module for t in adapter.TARGETS}
    with pytest.raises(ValueError, match="already registered"):
        mg.register_adapter(mg.REGISTRY["mlx_lm"])


def test_install_stays_a_function_after_the_module_is_imported() -> None:
    import subprocess
    import sys

    code = (
        "import metal_guard, metal_guard.installer, types; "
        "print(isinstance(metal_guard.install, types.FunctionType), callable(metal_guard.uninstall))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]
