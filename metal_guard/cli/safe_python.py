"""``mlx-safe-python``: a python that refuses to start ad-hoc work during a panic cooldown.

Usage is exactly ``python``'s: ``mlx-safe-python -c "import mlx.core"``, ``mlx-safe-python
script.py``. Behaviour:

* ``-m pip|pip3|pip3.X|build|venv|virtualenv|ensurepip`` and ``-V/--version/-h/--help`` run
  without asking the gate (they never touch Metal);
* gate says proceed (0) → the interpreter is ``exec``'d: its exit status is yours;
* cooldown/lockout (2) → blocked with a message on stderr, exit **10**, unless
  ``MLX_SAFE_PYTHON_FORCE=1`` (a warning is printed and the interpreter is exec'd);
* the gate is broken (3, or it crashed) → **fail-open**: a warning, the command runs as a child
  process, and ``mlx-safe-python`` exits **11** when the command succeeded (its own non-zero
  status otherwise), so automation can tell that the run was not gated.

The interpreter is ``MLX_SAFE_PYTHON_BIN`` or the one running this script; one that is not
executable gives exit 127. ``scripts/mlx-safe-python`` is a standalone bash twin for hosts
where the Python install itself is wedged.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence

EXIT_BLOCKED = 10
EXIT_FAIL_OPEN = 11
EXIT_NOT_EXECUTABLE = 127
_ALLOWED_MODULE_RE = re.compile(r"^(?:pip|pip3(?:\.\d+)?|build|venv|virtualenv|ensurepip)$")
_INFO_FLAGS = frozenset({"-V", "--version", "-VV", "-h", "--help", "-?"})
#: Interpreter options that take a separate argument.
_OPTS_WITH_ARG = frozenset({"-X", "-W", "--check-hash-based-pycs"})
_PREFIX = "mlx-safe-python"


def is_allowlisted(argv: Sequence[str]) -> bool:
    """True for invocations that never import Metal libraries (pip, venv, ``--version``...)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _INFO_FLAGS:
            return True
        if arg == "-m":
            return i + 1 < len(argv) and bool(_ALLOWED_MODULE_RE.match(argv[i + 1]))
        if arg.startswith("-m") and len(arg) > 2:
            return bool(_ALLOWED_MODULE_RE.match(arg[2:]))
        if arg in _OPTS_WITH_ARG:
            i += 2
            continue
        if arg.startswith("-") and arg not in ("-", "-c") and not arg.startswith("-c"):
            i += 1  # a flag such as -I, -u, -B, -E, -s, -S, -O
            continue
        return False  # -c, a script, or stdin
    return False


def _interpreter() -> str:
    from metal_guard.settings import get_settings

    try:
        configured = get_settings().safe_python_bin
    except Exception as exc:  # invalid MLX_SAFE_PYTHON_BIN
        print(f"{_PREFIX}: {exc}", file=sys.stderr)
        configured = None
    return str(configured) if configured is not None else sys.executable


def _force() -> bool:
    from metal_guard.settings import get_settings

    try:
        return bool(get_settings().safe_python_force)
    except Exception:
        return False


def _exec(python: str, argv: Sequence[str]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(python, [python, *argv])
    except OSError as exc:
        print(f"{_PREFIX}: cannot run {python}: {exc}", file=sys.stderr)
        return EXIT_NOT_EXECUTABLE
    return 0  # pragma: no cover - execv does not return


def _run_child(python: str, argv: Sequence[str]) -> int:
    """Run the interpreter as a child; forward SIGTERM/SIGHUP; return its status."""
    try:
        proc = subprocess.Popen([python, *argv])
    except OSError as exc:
        print(f"{_PREFIX}: cannot run {python}: {exc}", file=sys.stderr)
        return EXIT_NOT_EXECUTABLE
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, lambda s, _f: proc.send_signal(s))
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child gets it
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mlx-safe-python`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    python = _interpreter()
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        print(f"{_PREFIX}: interpreter {python!r} is not executable "
              "(set MLX_SAFE_PYTHON_BIN)", file=sys.stderr)
        return EXIT_NOT_EXECUTABLE
    if is_allowlisted(args):
        return _exec(python, args)
    try:
        from metal_guard.forensics.gate import evaluate_panic_cooldown

        verdict = evaluate_panic_cooldown()
        code, reason = verdict.exit_code, verdict.reason
    except Exception as exc:  # the gate itself is broken (half-installed package, ...)
        code, reason = 3, f"gate failed: {type(exc).__name__}: {exc}"
    if code == 0:
        return _exec(python, args)
    if code == 2:
        if _force():
            print(f"{_PREFIX}: WARNING: MLX_SAFE_PYTHON_FORCE=1 overrides an active cooldown "
                  f"({reason}). Importing Metal libraries now risks another kernel panic.",
                  file=sys.stderr)
            return _exec(python, args)
        print(f"{_PREFIX}: BLOCKED — {reason}\n"
              f"  pip/venv/build still work (`{_PREFIX} -m pip ...`).\n"
              "  Check with `metal-guard panic-gate -v`; after a lockout, investigate and run "
              "`metal-guard ack`.\n"
              f"  To run anyway: MLX_SAFE_PYTHON_FORCE=1 {_PREFIX} ...", file=sys.stderr)
        return EXIT_BLOCKED
    print(f"{_PREFIX}: WARNING: the panic gate could not decide ({reason}); running anyway "
          f"(fail-open). Exit status {EXIT_FAIL_OPEN} will mark a successful unguarded run.",
          file=sys.stderr)
    status = _run_child(python, args)
    return EXIT_FAIL_OPEN if status == 0 else status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
