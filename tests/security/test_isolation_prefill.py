"""Item 12: prompt prefill in an isolated worker is bounded.

It used to be unbounded: the worker's watcher thread heartbeat every second during prefill
whether or not the main thread progressed, so a 5 MB prompt with ``generate_timeout=10`` ran
for minutes (a 50 MB one grew the worker to 6.9 GB). Now heartbeats come only from finished
prefill chunks, the time to the first token is bounded by ``prefill_timeout``, and the R4
prefill guard refuses prompts whose estimated peak passes the ceiling before any prefill
allocation. Real worker, real tiny model, real (CPU) MLX.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from metal_guard import breadcrumbs
from metal_guard.errors import MetalOOMError, SubprocessTimeoutError
from metal_guard.isolation import MLXSubprocessRunner
from metal_guard.isolation.worker import HEARTBEAT_PHASES

GENEROUS = 120.0
SENTENCE = "The quick brown fox jumps over the lazy dog. "  # ~23 tokens with the tiny BPE


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class PeakRSS:
    """Samples a process's RSS from outside (like the footprint monitor) until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, psutil.Process(self.pid).memory_info().rss)
            except psutil.Error:
                return

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def observer(module_home: Path, tiny_model_path: Path) -> Iterator[MLXSubprocessRunner]:
    """A worker whose prefill guard only observes, so long prefills really run."""
    r = MLXSubprocessRunner(tiny_model_path, env={"METALGUARD_MODE": "observer"},
                            use_lock=False, generate_timeout=GENEROUS)
    yield r
    r.shutdown()


@pytest.fixture(scope="module")
def defensive(module_home: Path, tiny_model_path: Path) -> Iterator[MLXSubprocessRunner]:
    r = MLXSubprocessRunner(tiny_model_path, use_lock=False, generate_timeout=GENEROUS)
    yield r
    r.shutdown()


def test_the_watcher_no_longer_heartbeats_during_prefill() -> None:
    assert "prefill" not in HEARTBEAT_PHASES and "load" in HEARTBEAT_PHASES


@pytest.mark.timeout(300)
def test_a_big_prompt_with_a_small_timeout_ends_in_the_timeout_and_the_worker_is_killed(
        observer: MLXSubprocessRunner) -> None:
    """The issue's case: megabytes of prompt, a timeout of seconds. Tokenising alone takes
    longer than the timeout and reports no progress, so the timeout fires."""
    observer.generate("warm", max_tokens=2)
    pid = observer.worker_pid
    assert pid is not None
    prompt = SENTENCE * 45_000  # ~2 MB, ~1 M tokens
    start = time.monotonic()
    with PeakRSS(pid) as rss, pytest.raises(SubprocessTimeoutError) as info:
        observer.generate(prompt, max_tokens=4, timeout=2.0)
    elapsed = time.monotonic() - start
    err = info.value
    assert err.phase in ("tokenize", "prefill") and err.timeout == 2.0
    # Which of the two bounds speaks depends on whether tokenising reported the prefill's
    # start before the 2 s were up (it does on a fast box, not under load): both end here.
    assert ("made no progress for 2.0s" in str(err)
            or "did not finish the prompt prefill within 2.0s" in str(err)), str(err)
    assert str(err).endswith("killed")
    assert _gone(pid)
    assert elapsed < GENEROUS
    # memory stayed bounded: nowhere near the multi-GB growth of a run-away prefill
    assert 0 < rss.peak < 3e9, rss.peak
    # a prompt that was simply too long is not a GPU crash: the breaker is not fed
    from metal_guard.breaker import CircuitBreaker

    assert CircuitBreaker().status()["recent_crash_count"] == 0
    assert observer.generate("hello again", max_tokens=2)


@pytest.mark.timeout(300)
def test_prefill_that_keeps_progressing_is_still_bounded_by_prefill_timeout(
        observer: MLXSubprocessRunner) -> None:
    """Every prefill chunk is real progress (no no-progress timeout), but the time to the
    first token is bounded."""
    observer.generate("warm", max_tokens=2)
    pid = observer.worker_pid
    assert pid is not None
    prompt = SENTENCE * 700  # ~16 k tokens: passes the guard, tens of seconds of CPU prefill
    start = time.monotonic()
    with pytest.raises(SubprocessTimeoutError) as info:
        observer.generate(prompt, max_tokens=4, timeout=60.0, prefill_timeout=2.0)
    elapsed = time.monotonic() - start
    assert info.value.phase == "prefill"
    assert "prefill within 2.0s (prefill_timeout)" in str(info.value)
    assert _gone(pid)
    assert 2.0 <= elapsed < GENEROUS
    crumbs = [b for b in breadcrumbs.tail(200) if b.tag == "SUBPROC_TIMEOUT"]
    assert crumbs and crumbs[-1].meta["phase"] == "prefill"


@pytest.mark.timeout(300)
def test_the_runner_default_prefill_timeout_applies(tiny_model_path: Path) -> None:
    with MLXSubprocessRunner(tiny_model_path, env={"METALGUARD_MODE": "observer"},
                             use_lock=False, generate_timeout=60.0,
                             prefill_timeout=1.5) as r:
        assert r.generate("short prompts are fine", max_tokens=3)
        with pytest.raises(SubprocessTimeoutError, match=r"prefill within 1.5s"):
            r.generate(SENTENCE * 700, max_tokens=3)
    with pytest.raises(ValueError, match="prefill_timeout"):
        MLXSubprocessRunner(tiny_model_path, start=False, use_lock=False, prefill_timeout=0)


@pytest.mark.timeout(300)
def test_the_prefill_guard_refuses_an_oversize_prompt_in_the_worker(
        defensive: MLXSubprocessRunner) -> None:
    defensive.generate("warm", max_tokens=2)
    prompt = SENTENCE * 4_000  # ~90 k tokens: n_heads x ctx^2 alone is ~65 GB
    with PeakRSS(defensive.worker_pid or 0) as rss, pytest.raises(MetalOOMError) as info:
        defensive.generate(prompt, max_tokens=4)
    text = str(info.value)
    assert "prefill of" in text and "refused" in text and "ceiling" in text
    assert rss.peak < 2e9, rss.peak  # refused before the prefill allocated anything big
    # the worker answers the next, reasonable request
    assert defensive.generate("a short one", max_tokens=3)
