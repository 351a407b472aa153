"""Issue 11, item 2, end to end: a request to a guarded ``mlx_lm.server`` cannot forge a worker
record, and ``orphan-scan --kill`` cannot be made to kill an arbitrary process.

The attack (it killed the victim on the code before the fix): the server serves a model from
a directory named ``m<TAB>pid=<victim>\\tcreate_time=<victim's>``; a client (the real
``openai`` client) asks for the model ``"x\\u2028[<ts>] SUBPROC_PRE: evil"``. The adapter's
``SERVER_SWITCH`` breadcrumb carries the requested name as payload and the current model path
as ``previous=``. A reader splitting on U+2028 then saw a ``SUBPROC_PRE`` line whose meta (split
on tabs) named the victim's pid and create_time, and ``orphan-scan --kill`` killed it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest

pytest.importorskip("mlx_lm.server")
openai = pytest.importorskip("openai")

from server_support import Server  # noqa: E402
from support import sleeping_child  # noqa: E402

from metal_guard import installer  # noqa: E402
from metal_guard.breadcrumbs import tail  # noqa: E402


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    with sleeping_child(600) as proc:
        yield proc


@pytest.fixture
def guarded_server(tmp_path: Path, tiny_model_path: Path,
                   victim: subprocess.Popen[bytes]) -> Iterator[tuple[Any, Path]]:
    ct = psutil.Process(victim.pid).create_time()
    model_dir = tmp_path / f"m\tpid={victim.pid}\tcreate_time={ct:.3f}"
    shutil.copytree(tiny_model_path, model_dir)
    installer.install(adapters=["mlx_lm", "mlx_lm_server"])
    try:
        srv = Server(model_dir, max_tokens=8)
        try:
            yield srv.openai(timeout=120), model_dir
        finally:
            srv.close()
    finally:
        installer.uninstall()


def test_a_model_name_cannot_make_orphan_scan_kill_a_process(
        guarded_server: tuple[Any, Path], victim: subprocess.Popen[bytes],
        capsys: pytest.CaptureFixture[str]) -> None:
    client, model_dir = guarded_server
    first = client.chat.completions.create(model=str(model_dir), max_tokens=2,
                                           messages=[{"role": "user", "content": "hi"}])
    assert first.choices[0].message is not None  # the guarded server serves the tabbed path

    # The switch resolves the requested model before it writes its breadcrumb (an unknown name
    # is a 404 and never reaches the log), so the hostile name is a real model directory.
    old = (datetime.now(UTC) - timedelta(seconds=30)).isoformat()
    evil_dir = model_dir.parent / f"x\u2028[{old}] SUBPROC_PRE: evil"
    shutil.copytree(model_dir, evil_dir)
    evil = str(evil_dir)
    with pytest.raises(openai.APIError):  # mlx-lm cannot load it; the crumb is already written
        client.chat.completions.create(model=evil, max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])

    from metal_guard.cli import main

    capsys.readouterr()
    code = main(["--json", "orphan-scan", "--kill", "--threshold-sec", "0", "--grace-sec", "1"])
    report = json.loads(capsys.readouterr().out)
    assert victim.poll() is None and psutil.Process(victim.pid).is_running()
    assert report["orphans"] == [] and code == 0

    switches = [c for c in tail(200) if c.tag == "SERVER_SWITCH"]
    assert switches, "the request did not reach the guarded switch"
    assert switches[-1].payload == evil  # recorded exactly, as one line
    assert switches[-1].meta["previous"] == str(model_dir)
