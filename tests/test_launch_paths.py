"""Every way people launch MLX is guarded — or says it is not. Tested on the BUILT WHEEL.

One venv per module (built like ``test_autoload``'s: the wheel installed with ``--no-deps``, the
dev venv's site-packages appended by a ``.pth``). The venv is never activated: ``PATH`` does not
contain its ``bin/``, which is exactly the case where ``venv/bin/metal-guard run -- X`` used to
fail with 127 or pick another ``X`` from ``PATH``.

A ``sitecustomize`` on ``PYTHONPATH`` registers an ``atexit`` probe that reports, after the
launched module has run, how many metal-guard wrappers guard the functions its ``__main__``
block called — the real ``python -m`` path, observed from inside.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support import free_port
from test_autoload import Venv, _run, clean_env

pytestmark = pytest.mark.e2e
pytest.importorskip("mlx_lm")

PROBE = '''
import atexit, json, sys

def _mg_probe():
    try:
        from metal_guard.adapters.base import count_guards
        main = sys.modules["__main__"]
        out = {n: count_guards(getattr(main, n)) for n in ("generate", "stream_generate", "load")
               if hasattr(main, n)}
        lm = sys.modules.get("mlx_lm.generate")
        if lm is not None:
            out["lm_generate"] = count_guards(lm.generate)
        dispatch = sys.modules.get("mlx_vlm.generate.dispatch")
        if dispatch is not None:
            out["vlm_stream_generate"] = count_guards(dispatch.stream_generate)
        out["main_spec"] = getattr(getattr(main, "__spec__", None), "name", None)
    except Exception as exc:
        out = {"error": repr(exc)}
    sys.stderr.write("MGPROBE " + json.dumps(out) + "\\n")

atexit.register(_mg_probe)
'''


@pytest.fixture(scope="module")
def venv(wheel_venv: Venv) -> Venv:
    env = wheel_venv
    # What pip writes for mlx-lm's console script when mlx-lm is installed into this venv.
    script = env.root / "bin" / "mlx_lm.generate"
    script.write_text(f"#!{env.python}\nimport sys\nfrom mlx_lm.generate import main\n"
                      "if __name__ == '__main__':\n    sys.exit(main())\n")
    script.chmod(0o755)
    return env


@pytest.fixture
def probe_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "probe"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(PROBE)
    return folder


def _env(home: Path, probe: Path | None = None, **extra: str) -> dict[str, str]:
    env = clean_env(home, METALGUARD_CADENCE="0", HF_HUB_OFFLINE="1", **extra)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and ".venv" not in p)  # not activated, not the dev venv
    if probe is not None:
        env["PYTHONPATH"] = str(probe)
    return env


def _probe(stderr: str) -> dict:
    lines = [line for line in stderr.splitlines() if line.startswith("MGPROBE ")]
    assert lines, stderr[-3000:]
    return json.loads(lines[-1][len("MGPROBE "):])  # type: ignore[no-any-return]


def _announced(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("metal-guard ") and "guarding" in line]


def test_python_m_mlx_lm_generate_is_guarded(venv: Venv, tmp_path: Path, probe_dir: Path,
                                            tiny_model_path: Path) -> None:
    proc = _run([str(venv.root / "bin" / "metal-guard"), "run", "--", "python", "-m", "mlx_lm.generate",
                 "--model", str(tiny_model_path), "--prompt", "hi", "--max-tokens", "3"],
                _env(tmp_path, probe_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = _probe(proc.stderr)
    assert out["main_spec"] == "mlx_lm.generate"
    assert out["generate"] == 1 and out["stream_generate"] == 1
    announced = _announced(proc.stderr)
    assert len(announced) == 1 and "guarding mlx_lm" in announced[0]


def test_unguarded_before_the_fix_would_show_zero(venv: Venv, tmp_path: Path, probe_dir: Path,
                                                  tiny_model_path: Path) -> None:
    """Without metal-guard, the same probe sees no wrappers: the probe can tell them apart."""
    proc = _run([str(venv.python), "-m", "mlx_lm.generate", "--model", str(tiny_model_path),
                 "--prompt", "hi", "--max-tokens", "2"], _env(tmp_path, probe_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = _probe(proc.stderr)
    assert out["generate"] == 0 and out["stream_generate"] == 0
    assert not _announced(proc.stderr)


def test_bin_dir_script_runs_in_a_non_activated_venv_and_q_silences(venv: Venv, tmp_path: Path,
                                                                    probe_dir: Path,
                                                                    tiny_model_path: Path) -> None:
    proc = _run([str(venv.root / "bin" / "metal-guard"), "run", "-q", "--", "mlx_lm.generate",
                 "--model", str(tiny_model_path), "--prompt", "hi", "--max-tokens", "2"],
                _env(tmp_path, probe_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]  # was 127: the script is only in venv/bin
    assert _probe(proc.stderr)["lm_generate"] == 1
    assert not _announced(proc.stderr) and "UNGUARDED" not in proc.stderr


def test_a_python_that_cannot_import_metal_guard_is_named(venv: Venv, tmp_path: Path) -> None:
    import sys

    base = getattr(sys, "_base_executable", sys.executable)  # no metal-guard, no site-packages
    proc = _run([str(venv.root / "bin" / "metal-guard"), "run", "--", base, "-I", "-c", "print('ran')"],
                _env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ran"
    warnings = [line for line in proc.stderr.splitlines() if "UNGUARDED" in line]
    assert len(warnings) == 1 and base in warnings[0]


def test_python_m_mlx_vlm_generate_is_guarded(venv: Venv, tmp_path: Path, probe_dir: Path,
                                              tiny_vlm_path: Path, tiny_image_path: Path) -> None:
    proc = _run([str(venv.root / "bin" / "metal-guard"), "run", "--", "python", "-m", "mlx_vlm.generate",
                 "--model", str(tiny_vlm_path), "--prompt", "hi", "--image", str(tiny_image_path),
                 "--max-tokens", "2"], _env(tmp_path, probe_dir), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _probe(proc.stderr)["vlm_stream_generate"] == 1
    assert len(_announced(proc.stderr)) == 1


def _serve_and_get_status(command: list[str], env: dict[str, str], cwd: Path, port: int,
                          deadline_sec: float = 240.0) -> tuple[int, dict, str]:
    log = cwd / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + deadline_sec
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metal-guard/status", timeout=10) as r:
                    return r.status, json.loads(r.read()), log.read_text()
            except urllib.error.HTTPError as exc:
                return exc.code, {}, log.read_text()
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_python_m_mlx_lm_server_answers_status(venv: Venv, tmp_path: Path, tiny_model_path: Path) -> None:
    port = free_port()
    status, body, log = _serve_and_get_status(
        [str(venv.root / "bin" / "metal-guard"), "run", "--", "python", "-m", "mlx_lm.server",
         "--model", str(tiny_model_path), "--host", "127.0.0.1", "--port", str(port)],
        _env(tmp_path), tmp_path, port)
    assert status == 200, log[-3000:]  # was 404: the server ran as __main__, unguarded
    assert body["adapters"]["mlx_lm_server"] == "patched"
    assert len(_announced(log)) == 1


def test_python_m_mlx_vlm_server_answers_status(venv: Venv, tmp_path: Path) -> None:
    pytest.importorskip("mlx_vlm")
    pytest.importorskip("uvicorn")
    port = free_port()
    status, body, log = _serve_and_get_status(
        [str(venv.root / "bin" / "metal-guard"), "run", "--", "python", "-m", "mlx_vlm.server",
         "--host", "127.0.0.1", "--port", str(port)], _env(tmp_path), tmp_path, port)
    assert status == 200, log[-3000:]
    assert body["adapters"]["mlx_vlm_server"] == "patched"
    assert body["server"]["kind"] == "mlx_vlm.server" and body["server"]["limitations"]
