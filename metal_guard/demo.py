"""``metal-guard demo``: a guarded two-model pipeline on tiny local models, end to end.

What it does, in order (each step is real: real MLX, real subprocesses, real files):

1. builds — once, cached in ``<cache_dir>/tiny-models/`` — two tiny random llama models (a
   "drafter" and a "reviewer", ~0.4 MB each; nothing is downloaded);
2. ``metal_guard.install()``, then a guarded load of the drafter (panic gate, breaker, registry,
   fit check, cadence record, breadcrumbs);
3. a guarded load of the reviewer right after it: refused by the cross-model cadence, the demo
   waits out the interval and loads it;
4. guarded generation: the drafter writes, the reviewer answers the draft;
5. a subprocess-isolated generation (:class:`~metal_guard.isolation.MLXSubprocessRunner`);
6. a deliberately crashed worker (it ``abort()``s like MLX <= 0.31 did on a Metal error),
   classified, respawned and answering again;
7. the status snapshot, as a report a person can read.

The demo runs against a **throw-away state directory** (``METALGUARD_HOME`` points to a fresh
temporary directory for the duration, inherited by the worker), so the deliberate crash and the
cadence records never touch the real breaker or cadence state. It uses short demo intervals
(:data:`DEMO_CADENCE_SEC`, :data:`DEMO_CROSS_MODEL_SEC`) instead of the defaults (180 s / 0 s).
The models have random weights: their text is noise; what matters is that it ran guarded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DEMO_CADENCE_SEC", "DEMO_CROSS_MODEL_SEC", "DemoResult", "DemoStep", "demo_models", "run_demo"]

#: Same-model cadence used by the demo (the default is 180 s).
DEMO_CADENCE_SEC = 3.0
#: Cross-model cadence used by the demo (the default is 0 s = off).
DEMO_CROSS_MODEL_SEC = 1.5
DRAFT_PROMPT = "Write one sentence about the sea."


@dataclass
class DemoStep:
    name: str
    title: str
    ok: bool = False
    elapsed_sec: float = 0.0
    summary: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoResult:
    steps: list[DemoStep]
    wall_sec: float
    home: str
    home_kept: bool
    models: dict[str, str]
    settings: dict[str, Any]
    status: dict[str, Any] | None
    exit_code: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def demo_models(settings: Any = None) -> dict[str, Path]:
    """Where the demo's two tiny models live (in the real cache dir, kept between runs)."""
    from metal_guard.tinymodel import default_dir

    base = default_dir("lm", settings)
    return {"drafter": base, "reviewer": base.with_name("lm-reviewer")}


@contextlib.contextmanager
def _demo_home(home: str | None, keep: bool) -> Iterator[Path]:
    path = Path(home).expanduser() if home else Path(tempfile.mkdtemp(prefix="metal-guard-demo-"))
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    previous = os.environ.get("METALGUARD_HOME")
    os.environ["METALGUARD_HOME"] = str(path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop("METALGUARD_HOME", None)
        else:
            os.environ["METALGUARD_HOME"] = previous
        if not keep and not home:
            shutil.rmtree(path, ignore_errors=True)


class _Runner:
    """Runs the steps, timing each and reporting it through ``echo`` as it finishes."""

    def __init__(self, echo: Callable[[DemoStep, int, int], None] | None, total: int) -> None:
        self.steps: list[DemoStep] = []
        self.echo = echo
        self.total = total

    @contextlib.contextmanager
    def step(self, name: str, title: str) -> Iterator[DemoStep]:
        step = DemoStep(name, title)
        self.steps.append(step)
        started = time.perf_counter()
        try:
            yield step
            step.ok = True
        except BaseException as exc:
            step.summary = f"{type(exc).__name__}: {exc}"[:400]
            raise
        finally:
            step.elapsed_sec = round(time.perf_counter() - started, 3)
            if self.echo is not None:
                self.echo(step, len(self.steps), self.total)


def _clip(text: str, n: int = 48) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def run_demo(*, max_tokens: int = 12, home: str | None = None, keep_home: bool = False,
             echo: Callable[[DemoStep, int, int], None] | None = None) -> DemoResult:
    """Run the demo (see the module docstring); never raises for a failed step — the result
    says which step failed (``exit_code`` 4, or 2 when a panic cooldown refused the work)."""
    from metal_guard.settings import get_settings

    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    started = time.perf_counter()
    models = demo_models(get_settings())  # resolved with the user's real cache dir
    run = _Runner(echo, total=7)
    status: dict[str, Any] | None = None
    exit_code, error = 0, None
    with _demo_home(home, keep_home) as demo_home:
        try:
            _pipeline(run, models, max_tokens)
            with run.step("status", "status report") as step:
                from metal_guard.status import get_status_snapshot, snapshot_health

                status = get_status_snapshot(breadcrumb_lines=14)
                code, label = snapshot_health(status)
                status["health"] = {"exit_code": code, "label": label}
                step.summary = f"health {label}"
        except Exception as exc:
            from metal_guard.errors import MLXCooldownActive, PanicCooldownActive

            exit_code = 2 if isinstance(exc, MLXCooldownActive | PanicCooldownActive) else 4
            error = f"{type(exc).__name__}: {exc}"
        finally:
            from metal_guard import installer as mg

            mg.uninstall()
    return DemoResult(
        steps=run.steps, wall_sec=round(time.perf_counter() - started, 3), home=str(demo_home),
        home_kept=bool(keep_home or home), models={k: str(v) for k, v in models.items()},
        settings={"cadence_min_interval_sec": DEMO_CADENCE_SEC,
                  "cross_model_interval_sec": DEMO_CROSS_MODEL_SEC, "max_tokens": max_tokens},
        status=status, exit_code=exit_code, error=error)


def _load(mlx_lm: Any, path: Path) -> tuple[Any, Any]:
    model, tokenizer = mlx_lm.load(str(path))[:2]
    return model, tokenizer


def _pipeline(run: _Runner, models: dict[str, Path], max_tokens: int) -> None:
    from metal_guard import installer as mg
    from metal_guard.tinymodel import ensure_tiny_lm, is_tiny_model

    with run.step("models", "tiny models") as step:
        import importlib.util

        if importlib.util.find_spec("mlx_lm") is None:
            raise RuntimeError("the demo needs mlx-lm: pip install 'metal-guard[lm]'")
        cached = all(is_tiny_model(p) for p in models.values())
        ensure_tiny_lm(models["drafter"], seed=0)
        ensure_tiny_lm(models["reviewer"], seed=1)
        step.summary = ("cached" if cached else "built (once)") + f" in {models['drafter'].parent}"
        step.details = {"cached": cached, **{k: str(v) for k, v in models.items()}}

    mg.install(adapters=["mlx_lm"], cadence_min_interval_sec=DEMO_CADENCE_SEC,
               cross_model_interval_sec=DEMO_CROSS_MODEL_SEC)
    import mlx_lm

    with run.step("load_drafter", "guarded load (drafter)") as step:
        drafter, dtok = _load(mlx_lm, models["drafter"])
        step.summary = "gate, breaker, registry, fit check passed; load recorded for cadence"

    with run.step("load_reviewer", "guarded load (reviewer)") as step:
        from metal_guard.errors import CadenceViolation

        try:
            reviewer, rtok = _load(mlx_lm, models["reviewer"])
            waited = 0.0
        except CadenceViolation as refusal:
            waited = refusal.remaining_sec + 0.05
            step.details["refused"] = f"{type(refusal).__name__}: {refusal}"
            time.sleep(waited)
            reviewer, rtok = _load(mlx_lm, models["reviewer"])
        step.summary = (f"refused by the cross-model cadence ({DEMO_CROSS_MODEL_SEC:g} s demo interval), "
                        f"waited {waited:.1f} s, loaded" if waited else "loaded")
        step.details["waited_sec"] = round(waited, 3)

    with run.step("generate", "guarded generation") as step:
        draft = mlx_lm.generate(drafter, dtok, prompt=DRAFT_PROMPT, max_tokens=max_tokens)
        review = mlx_lm.generate(reviewer, rtok, prompt=f"Review this draft: {draft}",
                                 max_tokens=max_tokens)
        step.summary = f"drafter -> reviewer, 2 guarded calls: {_clip(review)!r}"
        step.details = {"draft": draft, "review": review}

    _isolation_steps(run, models["drafter"], max_tokens)


def _isolation_steps(run: _Runner, model: Path, max_tokens: int) -> None:
    from metal_guard.errors import SubprocessCrashError
    from metal_guard.isolation.runner import MLXSubprocessRunner
    from metal_guard.testing import _send_fault, worker_fault_env

    runner: MLXSubprocessRunner | None = None
    try:
        with run.step("isolated", "subprocess-isolated generation") as step:
            # Test faults are enabled for this worker only, so step 6 can crash it on purpose.
            runner = MLXSubprocessRunner(str(model), env=worker_fault_env(),
                                         load_timeout=120.0, generate_timeout=60.0)
            pid = runner.worker_pid
            text = runner.generate(DRAFT_PROMPT, max_tokens=max_tokens, temperature=0.0,
                                   apply_chat_template=False)
            step.summary = f"worker pid {pid} answered {_clip(text)!r}"
            step.details = {"worker_pid": pid, "text": text}

        with run.step("crash", "crashed worker, recovered") as step:
            old_pid = runner.worker_pid
            try:
                _send_fault(runner, "abort")  # the demo's own, ungated
            except SubprocessCrashError as crash:
                cls = crash.error_class.name if crash.error_class else "unclassified"
                step.details["crash"] = {"signal": crash.signal, "error_class": cls,
                                         "recovery_hint": crash.recovery_hint, "pid": old_pid}
            else:
                raise RuntimeError("the worker was asked to abort but did not crash")
            text = runner.generate(DRAFT_PROMPT, max_tokens=max_tokens, temperature=0.0,
                                   apply_chat_template=False)
            crash_info = step.details["crash"]
            step.summary = (f"worker {old_pid} died by {crash_info['signal']} [{crash_info['error_class']}]"
                            f" -> respawned as {runner.worker_pid} and answered")
            step.details.update(new_pid=runner.worker_pid, respawns=runner.respawn_count, text=text)
    finally:
        if runner is not None:
            runner.shutdown()
