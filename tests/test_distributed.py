"""Distributed ranks: detection from the launcher's environment, and real ``mlx.launch -n 2``
jobs on CPU with the ring backend (guarded load + generate on both ranks).

``mlx.launch`` exits 0 even when a rank fails, so every rank writes its own result file and
the tests read those.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from metal_guard import distributed
from metal_guard.breadcrumbs import parse_line
from metal_guard.cadence import CadenceGuard
from metal_guard.distributed import RankInfo, detect, rank_fields, register_group

# --------------------------------------------------------------------------- detection


def _hostfile(tmp_path: Path, hosts: list[list[str]] | str, name: str = "hostfile") -> Path:
    path = tmp_path / name
    path.write_text(hosts if isinstance(hosts, str) else json.dumps(hosts))
    return path


def test_not_a_rank_without_a_launcher() -> None:
    assert detect({}) is None
    assert detect({"MLX_RANK": "x"}) is None
    assert detect({"MLX_RANK": "-1"}) is None


def test_ring_rank_from_mlx_launch_env(tmp_path: Path) -> None:
    ring = [["127.0.0.1:5000"], ["127.0.0.1:5001"], ["127.0.0.1:5002"]]
    # mlx.launch writes one temporary hostfile per rank, with the same content
    a = detect({"MLX_RANK": "0", "MLX_HOSTFILE": str(_hostfile(tmp_path, ring, "a"))})
    b = detect({"MLX_RANK": "2", "MLX_HOSTFILE": str(_hostfile(tmp_path, ring, "b"))})
    assert a is not None and b is not None
    assert (a.rank, a.world_size, a.backend) == (0, 3, "ring") and b.rank == 2
    assert a.job == b.job and a.job_source == "topology"  # one job key for all ranks
    other = detect({"MLX_RANK": "0", "MLX_HOSTFILE": str(_hostfile(
        tmp_path, [["127.0.0.1:6000"], ["127.0.0.1:6001"]], "c"))})
    assert other is not None and other.job != a.job
    # a single-host ring: mlx.launch writes an empty hostfile
    single = detect({"MLX_RANK": "0", "MLX_HOSTFILE": str(_hostfile(tmp_path, "", "d"))})
    assert single is not None and single.world_size == 1 and not single.is_multi_rank
    # the job id setting wins
    named = detect({"MLX_RANK": "1", "MLX_HOSTFILE": str(tmp_path / "a")}, job_id="nightly-42")
    assert named is not None and (named.job, named.job_source) == ("nightly-42", "METALGUARD_JOB_ID")


def test_hostile_topology_files_are_not_followed_or_believed(tmp_path: Path) -> None:
    real = _hostfile(tmp_path, [["h:1"], ["h:2"]], "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    via_link = detect({"MLX_RANK": "0", "MLX_HOSTFILE": str(link)})
    assert via_link is not None and via_link.world_size is None  # not read through a symlink
    big = tmp_path / "big"
    big.write_text("[" + ",".join(['["h:1"]'] * 40000) + "]")
    huge = detect({"MLX_RANK": "0", "MLX_HOSTFILE": str(big)})
    assert huge is not None and huge.world_size is None
    # a rank outside the world is not a rank
    assert detect({"MLX_RANK": "5", "MLX_HOSTFILE": str(real)}) is None


def test_other_launchers(tmp_path: Path) -> None:
    nccl = detect({"MLX_RANK": "1", "MLX_WORLD_SIZE": "4", "NCCL_HOST_IP": "10.0.0.1", "NCCL_PORT": "12345"})
    assert nccl is not None and (nccl.rank, nccl.world_size, nccl.backend) == (1, 4, "nccl")
    devices = tmp_path / "ibv"
    devices.write_text(json.dumps([[None, "rdma_en2"], ["rdma_en2", None]]))
    jaccl = detect({"MLX_RANK": "0", "MLX_JACCL_COORDINATOR": "10.0.0.1:32323",
                    "MLX_IBV_DEVICES": str(devices)})
    assert jaccl is not None and (jaccl.world_size, jaccl.backend) == (2, "jaccl")
    mpi = detect({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "PMIX_NAMESPACE": "job.7"})
    assert mpi is not None and (mpi.rank, mpi.world_size, mpi.backend) == (3, 8, "mpi")
    assert detect({"PMI_RANK": "0", "PMI_SIZE": "2"}) is not None


def test_register_group_and_rank_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rank_fields() == {}
    try:
        info = register_group(rank=1, world_size=2, job="my-job")
        assert info == RankInfo(1, 2, "registered", "my-job", "registered")
        assert detect() == info and rank_fields() == {"rank": 1, "world_size": 2}
        with pytest.raises(ValueError):
            register_group(rank=2, world_size=2)
    finally:
        distributed.clear_registered_group()
    assert rank_fields() == {}


def test_lock_is_per_job(tmp_path: Path, metalguard_home: Path) -> None:
    """A verified holder of the same job lets a rank through; another job is refused."""
    holder_code = textwrap.dedent("""
        import sys, time
        from metal_guard.lock import acquire_mlx_lock
        acquire_mlx_lock("rank 0 load", job=sys.argv[1])
        print("HELD", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder_code, "ring:job-a"], stdout=subprocess.PIPE,
                            text=True, env={**os.environ})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "HELD"
        from metal_guard.errors import MLXLockConflict
        from metal_guard.lock import acquire_mlx_lock, mlx_exclusive_lock, read_mlx_lock

        assert read_mlx_lock()["job"] == "ring:job-a"
        with mlx_exclusive_lock("rank 1 load", job="ring:job-a") as info:
            assert info["job_shared"] and not info["acquired"] and info["holder"]["pid"] == proc.pid
        with pytest.raises(MLXLockConflict):
            acquire_mlx_lock("other job", job="ring:job-b")
        with pytest.raises(MLXLockConflict):
            acquire_mlx_lock("no job")
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- mlx.launch, for real

RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys, traceback
    out = {"rank_env": os.environ.get("MLX_RANK")}
    try:
        import metal_guard
        if os.environ.get("RANK_SCRIPT_INSTALL", "1") == "1":
            metal_guard.install()
        import mlx.core as mx
        import mlx_lm
        model, tok = mlx_lm.load(sys.argv[1])
        text = mlx_lm.generate(model, tok, prompt="hello", max_tokens=3)
        group = mx.distributed.init()
        total = mx.distributed.all_sum(mx.array([1.0]), group=group).item()
        from metal_guard.distributed import detect
        from metal_guard.heartbeat import read_published_memory
        from metal_guard.status import get_status_snapshot
        from metal_guard.status_prom import render_prometheus
        info = detect()
        mine = [p for p in read_published_memory() if p["pid"] == os.getpid()]
        snap = get_status_snapshot()
        out.update(ok=True, text_len=len(text), group=[group.rank(), group.size()], all_sum=total,
                   detected=info.as_dict() if info else None,
                   heartbeat={k: mine[0].get(k) for k in ("rank", "world_size")} if mine else None,
                   prom_has_rank=('rank="%s"' % group.rank()) in render_prometheus(snap))
    except BaseException as exc:
        out.update(ok=False, error="%s: %s" % (type(exc).__name__, exc), tb=traceback.format_exc()[-3000:])
    with open(os.path.join(sys.argv[2], "rank-%s.json" % os.environ.get("MLX_RANK")), "w") as fh:
        json.dump(out, fh)
""")


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        if port < 65000:
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


def _launch(prefix: list[str], script: Path, model: Path, results: Path, env: dict[str, str]) -> list[dict]:
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir()
    bindir = Path(sys.executable).parent
    argv = [*prefix, str(bindir / "mlx.launch"), "--hosts", "127.0.0.1", "-n", "2",
            "--backend", "ring", "-p", str(_free_port_pair()), "--python", sys.executable,
            str(script), str(model), str(results)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = []
    for rank in (0, 1):
        path = results / f"rank-{rank}.json"
        assert path.exists(), f"rank {rank} wrote no result; launcher stderr: {proc.stderr[-3000:]}"
        out.append(json.loads(path.read_text()))
    return out


@pytest.fixture
def launch_env(metalguard_home: Path) -> dict[str, str]:
    pytest.importorskip("mlx_lm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALGUARD_")}
    # the seed's fixed 180 s (tiny models would not wait otherwise) and the L8 lock: without
    # rank awareness the second rank would be refused by cadence, or by the lock
    env.update(METALGUARD_HOME=str(metalguard_home), METALGUARD_CADENCE_MIN_INTERVAL_SEC="180",
               METALGUARD_USE_LOCK="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def test_mlx_launch_two_ranks_guarded_load_and_generate(tmp_path: Path, tiny_model_path: Path,
                                                        launch_env: dict[str, str]) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    ranks = _launch([], script, tiny_model_path, tmp_path / "run1", launch_env)
    for rank, out in enumerate(ranks):
        assert out.get("ok"), out
        assert out["group"] == [rank, 2] and out["all_sum"] == 2.0 and out["text_len"] >= 0
        assert out["detected"]["rank"] == rank and out["detected"]["world_size"] == 2
        assert out["heartbeat"] == {"rank": rank, "world_size": 2}
        assert out["prom_has_rank"]
    assert ranks[0]["detected"]["job"] == ranks[1]["detected"]["job"]
    # one logical load for cadence, recorded with both ranks
    rec = CadenceGuard().records()[str(tiny_model_path)]
    assert rec["ranks"] == [0, 1] and rec["world_size"] == 2
    # breadcrumbs carry rank/world_size
    log = Path(launch_env["METALGUARD_HOME"]) / "state" / "metal_breadcrumb.log"
    crumbs = [c for c in map(parse_line, log.read_text().splitlines()) if c and c.tag == "LOAD"]
    assert {(c.meta.get("rank"), c.meta.get("world_size")) for c in crumbs} == {("0", "2"), ("1", "2")}

    # the same job command run again at once is a new load: both ranks are refused by cadence
    again = _launch([], script, tiny_model_path, tmp_path / "run2", launch_env)
    assert all(not out["ok"] and "CadenceViolation" in out["error"] for out in again), again


def test_metal_guard_run_wraps_mlx_launch(tmp_path: Path, tiny_model_path: Path,
                                          launch_env: dict[str, str]) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**launch_env, "RANK_SCRIPT_INSTALL": "0"}  # no install() in the script: `run` guards it
    bindir = Path(sys.executable).parent
    ranks = _launch([str(bindir / "metal-guard"), "run", "--"], script, tiny_model_path,
                    tmp_path / "run", env)
    for rank, out in enumerate(ranks):
        assert out.get("ok"), out
        assert out["group"] == [rank, 2] and out["heartbeat"] == {"rank": rank, "world_size": 2}
    rec = CadenceGuard().records()[str(tiny_model_path)]
    assert rec["ranks"] == [0, 1]  # the loads went through the guard on both ranks
