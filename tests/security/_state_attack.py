"""Shared by the state-file security tests: the table of safety state files, a real second
user (for ownership), and a way to get real EACCES as root.

Root reads through any mode, and a second user cannot run this interpreter (it lives under
``/root``), so EACCES is produced by running the check as root *without* the capabilities
that bypass file permissions (``setpriv --bounding-set -dac_override,-dac_read_search``):
the kernel then applies the file's mode bits to us as to anyone.

``STATE_FILES`` maps a state file to ``seed`` (write state that makes its check refuse, or
that must survive) and ``op`` (the library call that reads-and-maybe-writes it, as a guarded
load would). The module is importable by a subprocess running as the second user.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _breaker() -> Any:
    from metal_guard.breaker import CircuitBreaker

    return CircuitBreaker(auto_ingest=False)


def _seed_breaker() -> None:
    now = time.time()
    _breaker().record_failure("gpu_hang", now=now - 2)
    try:
        _breaker().record_failure("gpu_hang", now=now - 1)
    except Exception:
        pass


def _seed_panics() -> None:
    from metal_guard.breaker import ingest_panics_jsonl
    from metal_guard.forensics.records import PanicRecord

    now = time.time()
    ingest_panics_jsonl(records=[
        PanicRecord(path=f"/r/{i}.panic", timestamp=now - 60 * (i + 1), is_gpu=True,
                    signature="IOGPUMemory completeMemory() prepare count underflow")
        for i in range(2)])


def _op_breaker() -> Any:
    return _breaker().check()


def _seed_cadence() -> None:
    from metal_guard.cadence import CadenceGuard

    CadenceGuard().mark_load("org/model-x")


def _op_cadence() -> Any:
    from metal_guard.cadence import require_cadence_clear

    return require_cadence_clear("org/model-x")


def _seed_ledger() -> None:
    from metal_guard.ledger import record_peak

    record_peak("org/model-x", 10_000, quantization="4bit", mlx_version="v", chip="c")


def _op_ledger() -> Any:
    from metal_guard.ledger import record_peak

    return record_peak("org/model-x", 5_000, quantization="4bit", mlx_version="v", chip="c")


def _seed_sentinel() -> None:
    from metal_guard.forensics.gate import mark_panic_sentinel_cooldown

    mark_panic_sentinel_cooldown(1.0)


def _op_sentinel() -> Any:
    from metal_guard.forensics.gate import mark_panic_sentinel_cooldown

    return mark_panic_sentinel_cooldown(0.5)


#: name -> (file name in the state dir, seed, op)
STATE_FILES: dict[str, tuple[str, Callable[[], None], Callable[[], Any]]] = {
    "breaker": ("breaker.json", _seed_breaker, _op_breaker),
    "panics": ("panics.jsonl", _seed_panics, _op_breaker),
    "cadence": ("cadence.json", _seed_cadence, _op_cadence),
    "ledger": ("peak_ledger.json", _seed_ledger, _op_ledger),
    "sentinel": ("panic-sentinel.json", _seed_sentinel, _op_sentinel),
}


def run_op(name: str) -> str:
    """Run the op of ``name``; the outcome as a short string (exception class or ``ok``)."""
    try:
        STATE_FILES[name][2]()
    except Exception as exc:
        return type(exc).__name__
    return "ok"


# --------------------------------------------------------------------------- a second user


@contextlib.contextmanager
def other_user() -> Iterator[pwd.struct_passwd]:
    """A fresh local user (removed afterwards); skips the test when not root."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("needs root to create a second user")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("useradd/userdel not available")
    name = f"mgst{os.getpid() % 100000}{int(time.time() * 1000) % 10000}"
    for _attempt in range(20):  # /etc/passwd may be locked by a parallel useradd
        done = subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name],
                              capture_output=True, text=True)
        if done.returncode == 0:
            break
        if "already exists" in done.stderr:
            name += "x"
        time.sleep(0.2)
    else:
        pytest.skip(f"useradd failed: {done.stderr.strip()}")
    try:
        yield pwd.getpwnam(name)
    finally:
        for _attempt in range(50):  # 6: already gone; other codes: passwd locked, user busy
            if subprocess.run(["userdel", name], capture_output=True).returncode in (0, 6):
                break
            time.sleep(0.2)
        else:
            import warnings

            warnings.warn(f"could not remove test user {name}", stacklevel=1)


def user_env(base: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("METALGUARD_", "MLX_SAFE_PYTHON_")) and k != "MLX_LOCK_PATH"}
    reports = base / "reports"
    reports.mkdir(exist_ok=True)
    env.update(METALGUARD_HOME=str(home), METALGUARD_DIAGNOSTIC_REPORTS_DIRS=str(reports),
               HOME=str(base), PYTHONDONTWRITEBYTECODE="1")
    return env


def no_dac_prefix() -> list[str]:
    """argv prefix that runs a command as root minus the permission-bypassing capabilities."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("needs root (to drop CAP_DAC_OVERRIDE for a real EACCES)")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv not available")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]


def run_no_dac(argv: list[str], env: dict[str, str], timeout: float = 120
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*no_dac_prefix(), *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd="/")


def python_no_dac(code: str, env: dict[str, str]) -> Any:
    """Run ``code`` (which prints one JSON value last) without DAC override; return the value."""
    prelude = f"import sys; sys.path.insert(0, {str(HERE)!r})\n"
    done = run_no_dac([sys.executable, "-c", prelude + code], env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def chown_tree(path: Path, user: pwd.struct_passwd) -> None:
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), user.pw_uid, user.pw_gid)
    os.lchown(path, user.pw_uid, user.pw_gid)
