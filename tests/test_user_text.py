"""No internal shorthand in what a user reads: the L-codes (L1..L14, L10b) and R-series (R4,
R6, R8) of the design map stay in docs and code comments, never in CLI help, exception
messages, warnings or log lines.

Three nets: every subcommand's real ``--help``; the messages of every exception type (real
refusals where they are cheap to provoke, constructed ones otherwise); and every string literal
of the package that is not a docstring or a documentation-table row (settings and options
descriptions only feed docs/configuration.md and docs/integration.md).
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

import metal_guard
from metal_guard import errors
from metal_guard.cli import build_parser, main

SHORTHAND = re.compile(r"\b[LR]\d+[a-z]?\b")
PACKAGE = Path(metal_guard.__file__).parent
#: Calls whose string arguments are documentation-table rows, not printed text.
DOC_TABLE_CALLS = {"_Var", "Option"}


def _subcommand_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
                      ) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append((*prefix, name))
                paths.extend(_subcommand_paths(sub, (*prefix, name)))
    return paths


SUBCOMMANDS = _subcommand_paths(build_parser())


def test_there_are_subcommands_to_scan() -> None:
    names = {path[0] for path in SUBCOMMANDS}
    assert {"lock", "breaker", "panic-gate", "ack", "postmortem", "orphan-scan", "status-write",
            "mode", "cadence", "doctor"} <= names


@pytest.mark.parametrize("argv", [(), *SUBCOMMANDS], ids=lambda p: " ".join(p) or "metal-guard")
def test_help_has_no_internal_shorthand(argv: tuple[str, ...],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--help"]) == 0
    text = capsys.readouterr().out
    assert "usage:" in text
    assert not SHORTHAND.findall(text), (argv, SHORTHAND.findall(text), text)


def _constructed() -> dict[str, BaseException]:
    from metal_guard.forensics.gate import CooldownVerdict

    verdict = CooldownVerdict(exit_code=2, reason="1 GPU panic in 24 h: cooldown",
                              cooldown_until=2e9, state="cooldown")
    return {
        "AdapterError": errors.AdapterError("mlx_lm: targets not found"),
        "CadenceViolation": errors.CadenceViolation("m", last_ts=1.0, min_interval=60.0, delta=5.0),
        "CrossModelCadenceViolation": errors.CrossModelCadenceViolation("m", "n", 1.0, 60.0, 5.0),
        "GuardLayerError": errors.GuardLayerError("metal_guard.breaker", "ImportError: gone"),
        "KnownPanicModelError": errors.KnownPanicModelError("m", {"tier": "panic"}),
        "LoadRefused": errors.LoadRefused("refused"),
        "MLXCooldownActive": errors.MLXCooldownActive(remaining_sec=30.0, panic_count=2,
                                                      window_sec=3600.0),
        "MLXLockConflict": errors.MLXLockConflict({"pid": 7, "label": "bench"}),
        "MetalGuardError": errors.MetalGuardError("x"),
        "MetalOOMError": errors.MetalOOMError("[METAL] Command buffer execution failed: "
                                              "Insufficient Memory"),
        "ModelDoesNotFitError": errors.ModelDoesNotFitError("does not fit", model_name="m",
                                                            required_bytes=10, available_bytes=1),
        "PanicCooldownActive": errors.PanicCooldownActive(verdict),
        "SettingsError": errors.SettingsError("METALGUARD_MODE", "x", "defensive/observer"),
        "StateFileError": errors.StateFileError("/s/breaker.json", "cannot read"),
        "SubprocessCrashError": errors.SubprocessCrashError("m", -6, "abort", signal="SIGABRT",
                                                            phase="load", worker_pid=9),
        "SubprocessTimeoutError": errors.SubprocessTimeoutError("m", 5.0, worker_pid=9),
        "WorkerError": errors.WorkerError("boom", exc_type="TypeError", phase="generate"),
        "WorkerFailure": errors.WorkerFailure("failed"),
    }


def test_every_exception_type_message_is_free_of_shorthand() -> None:
    built = _constructed()
    exported = {name for name in errors.__all__
                if isinstance(getattr(errors, name), type)
                and issubclass(getattr(errors, name), BaseException)}
    assert exported <= set(built), f"add a sample for {sorted(exported - set(built))}"
    for name, exc in built.items():
        assert not SHORTHAND.search(str(exc)), (name, str(exc))


def test_real_refusals_are_free_of_shorthand(monkeypatch: pytest.MonkeyPatch) -> None:
    from metal_guard.breaker import CircuitBreaker
    from metal_guard.cadence import require_cadence_clear
    from metal_guard.forensics.gate import evaluate_panic_cooldown, mark_panic_sentinel_cooldown

    breaker = CircuitBreaker(auto_ingest=False)
    breaker.record_failure("worker_crash", "abort")
    breaker.record_failure("worker_crash", "abort")
    with pytest.raises(errors.MLXCooldownActive) as open_breaker:
        breaker.check()
    mark_panic_sentinel_cooldown(1.0, reason="postmortem found a panic")
    verdict = evaluate_panic_cooldown()
    assert not verdict.proceed
    gate = errors.PanicCooldownActive(verdict)
    monkeypatch.setenv("METALGUARD_CADENCE_MIN_INTERVAL_SEC", "600")
    require_cadence_clear("models/tiny")
    with pytest.raises(errors.CadenceViolation) as cadence:
        require_cadence_clear("models/tiny")
    for exc in (open_breaker.value, gate, cadence.value):
        assert not SHORTHAND.search(str(exc)), str(exc)


def _printed_strings(path: Path) -> list[tuple[int, str]]:
    """String literals of ``path`` (f-string parts included) other than docstrings and the
    arguments of documentation-table rows."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.add(id(first.value))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in DOC_TABLE_CALLS:
            skip.update(id(sub) for sub in ast.walk(node))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in skip]


def test_no_string_the_package_prints_carries_shorthand() -> None:
    found = [f"{path.relative_to(PACKAGE)}:{line}: {text[:100]!r}"
             for path in sorted(PACKAGE.rglob("*.py"))
             for line, text in _printed_strings(path) if SHORTHAND.search(text)]
    assert not found, "\n".join(found)


def test_the_scanner_sees_shorthand_where_it_is(tmp_path: Path) -> None:
    """The net itself: a log line and an f-string with an L-code are found; a docstring and a
    settings row are not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""L8 docs."""\n'
        'import logging\n'
        'def f(x):\n'
        '    """L9 docstring."""\n'
        '    logging.warning("L10 gate says %s", x)\n'
        '    raise ValueError(f"R4 guard: {x}")\n'
        'ROW = _Var("MLX_LOCK_PATH", "lock_path", None, None, "L8 lock file")\n'
    )
    hits = [text for _line, text in _printed_strings(sample) if SHORTHAND.search(text)]
    assert sorted(hits) == ["L10 gate says %s", "R4 guard: "]
