"""Shared fixtures: an isolated metal-guard home for every test, and tiny local models.

* ``_isolated_home`` (autouse): ``METALGUARD_HOME`` and ``METALGUARD_DIAGNOSTIC_REPORTS_DIRS``
  point into the test's tmp dir; every other metal-guard variable is removed; Hugging Face is
  put offline. No test ever touches the real state, cache or report directories.
* ``metalguard_home``: the isolated home directory (a ``Path``).
* ``tiny_model_path`` / ``tiny_vlm_path`` / ``tiny_image_path`` (session): a tiny llama for
  ``mlx_lm``, a tiny PaliGemma for ``mlx_vlm`` and a 64x64 PNG, built once per session. Set
  ``METALGUARD_TEST_MODEL_CACHE=/some/dir`` to keep them between runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # imported by the fixtures that use it (it imports mlx_lm.server)
    from server_support import Server

#: Read by the session fixtures below; deliberately not cleared by ``_isolated_home``.
MODEL_CACHE_ENV = "METALGUARD_TEST_MODEL_CACHE"

_CLEARED_PREFIXES = ("METALGUARD_", "MLX_SAFE_PYTHON_")
_CLEARED_NAMES = ("MLX_LOCK_PATH", "MLX_FORCE_WAIT_SEC", "MLX_RECLAIM_COOLDOWN_SEC")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name in list(os.environ):
        if name == MODEL_CACHE_ENV:
            continue
        if name.startswith(_CLEARED_PREFIXES) or name in _CLEARED_NAMES:
            monkeypatch.delenv(name, raising=False)
    # Outside the test's own tmp_path, so a test sees an empty tmp_path.
    root = tmp_path_factory.mktemp("mg-isolated")
    home = root / "home"
    home.mkdir(mode=0o700)
    reports = root / "diagnostic-reports"
    reports.mkdir()
    monkeypatch.setenv("METALGUARD_HOME", str(home))
    monkeypatch.setenv("METALGUARD_DIAGNOSTIC_REPORTS_DIRS", str(reports))
    monkeypatch.setenv("METALGUARD_LEGACY_DIR", str(root / "legacy-0.11"))  # never the real ~/.cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield home


@pytest.fixture
def drop_lock_holds() -> Iterator[None]:
    """After the test, release any cross-process MLX lock hold it left behind (a failed test
    must not leave the next one blocked); the lock tests use it for every test."""
    yield
    from metal_guard import lock as lockmod

    with lockmod._COND:
        for hold in list(lockmod._HOLDS.values()):
            hold.lock.release(force=True)
        lockmod._HOLDS.clear()


@pytest.fixture
def rdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty diagnostic-reports directory that the code under test scans."""
    d = tmp_path / "reports"
    d.mkdir()
    monkeypatch.setenv("METALGUARD_DIAGNOSTIC_REPORTS_DIRS", str(d))
    return d


@pytest.fixture(scope="module")
def module_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An isolated metal-guard home for module-scoped resources (e.g. a shared worker)."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("mg-module-home")
    for name in list(os.environ):
        if name.startswith("METALGUARD_") and name != MODEL_CACHE_ENV:
            mp.delenv(name)
    mp.setenv("METALGUARD_HOME", str(home))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield home
    mp.undo()


@pytest.fixture
def start_server() -> Iterator[Callable[..., Server]]:
    """``start_server(model, **server_args)``: a real in-process ``mlx_lm.server``
    (``tests/server_support.py``); every one started is closed after the test."""
    from server_support import Server

    servers: list[Server] = []

    def start(model: Path | None, **over: Any) -> Server:
        srv = Server(model, **over)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.close()


@pytest.fixture(scope="module")
def shared_server(module_home: Path, tiny_model_path: Path) -> Iterator[Server]:
    """One ready in-process ``mlx_lm.server`` for a whole test module (started under
    metal-guard, which is uninstalled again; see ``server_support.module_server``)."""
    from server_support import module_server

    srv = module_server(tiny_model_path)
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> object:
    """A fresh venv with the wheel built from the working tree (see tests/test_autoload.py);
    built once per session and shared by the modules that test the installed package."""
    from test_autoload import build_wheel_venv

    return build_wheel_venv(tmp_path_factory.mktemp("wheel-venv"))


@pytest.fixture
def metalguard_home(_isolated_home: Path) -> Path:
    """The per-test ``METALGUARD_HOME`` (exists, empty at the start of the test)."""
    return _isolated_home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's tiny models live (``$METALGUARD_TEST_MODEL_CACHE`` if set)."""
    cache = os.environ.get(MODEL_CACHE_ENV, "").strip()
    if cache:
        path = Path(cache).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("tiny-models")


def _timed(label: str, build: Callable[[], Path]) -> Path:
    start = time.perf_counter()
    path = build()
    elapsed = time.perf_counter() - start
    if elapsed > 0.5:  # shown with -s, or in the report of a failing test
        print(f"\n[conftest] {label} ready in {elapsed:.2f}s at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_model_path(tiny_model_dir: Path) -> Path:
    """A tiny random llama (``mlx_lm.load(str(path))`` works), seed 0, ~430 KB of weights."""
    pytest.importorskip("mlx_lm")
    from metal_guard.tinymodel import ensure_tiny_lm

    return _timed("tiny LM", lambda: ensure_tiny_lm(tiny_model_dir / "tiny-lm"))


@pytest.fixture(scope="session")
def tiny_vlm_path(tiny_model_dir: Path) -> Path:
    """A tiny random PaliGemma (``mlx_vlm.load(str(path))`` works), ~220 KB of weights."""
    pytest.importorskip("mlx_vlm")
    from metal_guard.tinymodel import ensure_tiny_vlm

    return _timed("tiny VLM", lambda: ensure_tiny_vlm(tiny_model_dir / "tiny-vlm"))


@pytest.fixture(scope="session")
def tiny_image_path(tiny_model_dir: Path) -> Path:
    """A deterministic 64x64 RGB PNG."""
    pytest.importorskip("PIL")
    from metal_guard.tinymodel import write_tiny_image

    return write_tiny_image(tiny_model_dir / "tiny-image.png")


# --------------------------------------------------------------------------- CI: no silent skips

#: Set by ``.ci/run``: with every extra installed, a skipped test is a hidden failure (a broken
#: ``import mlx_lm`` would otherwise turn whole modules into skips and the run green).
NO_SKIPS_ENV = "METALGUARD_CI_NO_SKIPS"
_no_skips: list[bool] = [False]
_skipped: list[tuple[str, str]] = []


def pytest_configure(config: pytest.Config) -> None:
    # Read once, before the autouse fixture clears METALGUARD_* variables for each test.
    _no_skips[0] = os.environ.get(NO_SKIPS_ENV, "").strip() == "1"
    _skipped.clear()


def _note_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):  # an xfail is not a skip
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    _skipped.append((report.nodeid or "<collection>", str(reason)))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_skip(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip(report)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _no_skips[0] and _skipped:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _no_skips[0]:
        return
    if not _skipped:
        terminalreporter.write_line(f"{NO_SKIPS_ENV}=1: no test was skipped")
        return
    terminalreporter.section(f"{NO_SKIPS_ENV}=1: {len(_skipped)} skipped, and a skip fails this run",
                             sep="=", red=True, bold=True)
    for nodeid, reason in _skipped:
        terminalreporter.write_line(f"SKIPPED {nodeid}: {reason}")
