"""Defect 5 of issue 12: every way a request enters a batch runs the generate policy.

mlx-lm 0.32.2's server inserts with ``BatchGenerator.insert_segments``; an unguarded entry point
meant no inference counting, no periodic flush and no prefill guard on the default path.
"""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("mlx_lm.server")

from mlx_lm.generate import BatchGenerator
from server_support import Server

from metal_guard import installer as mg
from metal_guard.adapters import mlx_lm as adapter
from metal_guard.resources import global_resource_tracker

#: Public methods of BatchGenerator through which a request enters a batch.
ENTERS_A_BATCH = {"insert", "insert_segments"}
#: Public methods reviewed as *not* entering a batch (steps are guarded separately).
REVIEWED_OTHERS = {"stream", "close", "stats", "extract_cache", "remove", "prompt_cache_nbytes",
                   "next", "next_generated"}


def test_every_public_batch_entry_is_a_generate_target() -> None:
    public = {name for cls in BatchGenerator.__mro__ if cls is not object
              for name in vars(cls) if not name.startswith("_")}
    new = public - ENTERS_A_BATCH - REVIEWED_OTHERS
    assert not new, (
        f"mlx-lm's BatchGenerator has new public method(s) {sorted(new)}: if one of them puts a "
        f"request into a batch, add it to metal_guard/adapters/mlx_lm.py TARGETS with the "
        f"'generate' policy and to ENTERS_A_BATCH here; otherwise add it to REVIEWED_OTHERS")
    targets = {t.path.split(".", 1)[1]: t.policy for t in adapter.TARGETS
               if t.module == "mlx_lm.generate" and t.path.startswith("BatchGenerator.")}
    missing = {name for name in ENTERS_A_BATCH if targets.get(name) != "generate"}
    assert not missing, f"batch entry points without the generate policy: {sorted(missing)}"
    assert {"next", "next_generated"} <= set(targets)  # steps: OOM protection


def test_insert_segments_describes_the_prompts() -> None:
    info = adapter.describe_batch_insert_segments(None, ([[[1, 2, 3], [4]], [[5]]],), {})
    assert info.count == 2 and info.prompt_tokens == 4
    assert info.site.endswith("BatchGenerator.insert_segments")


def test_batched_requests_are_counted_once_each(shared_server: Server) -> None:
    mg.install()
    try:
        tracker = global_resource_tracker()
        assert shared_server.complete()[0] == 200  # warm: the batch generator exists
        before = tracker.count
        results: list[int] = []

        def client() -> None:
            for _ in range(3):
                results.append(shared_server.complete("count me")[0])

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert results == [200] * 12
        # one inference per request (insert → insert_segments is guarded once, not twice)
        assert tracker.count - before == 12
        # and the sequential path (seeded) counts too
        assert shared_server.complete("seeded", seed=1)[0] == 200
        assert tracker.count - before == 13
    finally:
        mg.uninstall()


def test_periodic_flush_runs_on_the_batched_path(shared_server: Server, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("METALGUARD_FLUSH_EVERY_N", "1")
    mg.install()  # refreshes the hot-path settings
    try:
        with caplog.at_level("DEBUG", logger="metal_guard.policy"):
            assert shared_server.complete("flush me")[0] == 200
        flushes = [r for r in caplog.records if r.getMessage().startswith("periodic flush after")]
        assert flushes, "no periodic flush on the batched path"
    finally:
        mg.uninstall()
