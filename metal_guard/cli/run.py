"""``metal-guard run -- <cmd> [args...]``: run a command with metal-guard activated, no code change.

It sets ``METALGUARD_AUTOLOAD=1`` (plus the options given, as ``METALGUARD_*`` variables) and
``exec``s the command, so ``metal-guard run -- mlx_lm.server --model X`` is a guarded server.
Activation comes from the ``metal_guard-autoload.pth`` start-up file the wheel installs. Where
that file is missing (an editable install, an installer that drops root files), ``run`` falls
back to putting metal-guard's ``sitecustomize`` shim first on ``PYTHONPATH``; the shim runs any
``sitecustomize`` it shadows. ``--sitecustomize`` forces the shim, ``--no-sitecustomize``
forbids it.

The command is looked up in the running interpreter's own bin directory first, then on
``PATH``: ``venv/bin/metal-guard run -- mlx_lm.server`` runs ``venv/bin/mlx_lm.server`` even
when the venv is not activated (and another ``mlx_lm.server`` or ``python`` sits first on
``PATH``). When that directory is a virtual environment's, it is also put first on the child's
``PATH``, as activating the venv would. When the command is (or starts with a ``#!`` line
naming) a different Python that cannot import metal-guard, one warning line says that it
will run unguarded. The child writes one line to stderr when its first adapter patches
(``METALGUARD_ANNOUNCE=1``); ``-q`` silences that line, never a warning.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

from metal_guard.autoload import pth_installed, shim_dir
from metal_guard.cli import EXIT_USAGE, add_command

EXIT_NOT_FOUND = 127  # the shell's "command not found"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(subparsers, "run", help="run a command with metal-guard activated (zero code)",
                    usage="metal-guard run [options] -- <cmd> [args...]")
    p.add_argument("--adapters", help="comma-separated adapters to enable (METALGUARD_ADAPTERS)")
    p.add_argument("--disable-adapters", dest="disabled_adapters",
                   help="comma-separated adapters to disable (METALGUARD_DISABLED_ADAPTERS)")
    p.add_argument("--mode", choices=("defensive", "observer"), help="METALGUARD_MODE")
    p.add_argument("--strict", action="store_true", help="METALGUARD_STRICT=1")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no 'metal-guard ... guarding' line from the child (METALGUARD_ANNOUNCE=0)")
    shim = p.add_mutually_exclusive_group()
    shim.add_argument("--sitecustomize", dest="shim", action="store_const", const=True,
                      help="always activate through the sitecustomize shim on PYTHONPATH")
    shim.add_argument("--no-sitecustomize", dest="shim", action="store_const", const=False,
                      help="rely on the .pth only")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    p.set_defaults(func=run, shim=None)


def build_env(args: argparse.Namespace, base: dict[str, str] | None = None) -> tuple[dict[str, str], bool]:
    """The child's environment, and whether the sitecustomize shim is used."""
    env = dict(os.environ if base is None else base)
    env["METALGUARD_AUTOLOAD"] = "1"
    for value, var in ((args.adapters, "METALGUARD_ADAPTERS"),
                       (args.disabled_adapters, "METALGUARD_DISABLED_ADAPTERS"),
                       (args.mode, "METALGUARD_MODE")):
        if value:
            env[var] = value
    if args.strict:
        env["METALGUARD_STRICT"] = "1"
    if getattr(args, "quiet", False):
        env["METALGUARD_ANNOUNCE"] = "0"
    else:
        env.setdefault("METALGUARD_ANNOUNCE", "1")
    folder = bin_dir()
    if sys.prefix != sys.base_prefix:  # a venv's bin/: put it first, as activating it would
        parts = [p for p in env.get("PATH", "").split(os.pathsep) if p]
        if not parts or os.path.normcase(parts[0]) != os.path.normcase(folder):
            env["PATH"] = os.pathsep.join([folder, *parts])
    use_shim = args.shim if args.shim is not None else not pth_installed()
    if use_shim:
        folder = str(shim_dir())
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != folder]
        env["PYTHONPATH"] = os.pathsep.join([folder, *parts])
    return env, use_shim


def bin_dir() -> str:
    """The running interpreter's own script directory (a venv's ``bin/``; symlinks kept)."""
    return os.path.dirname(os.path.abspath(sys.executable))


def resolve_command(name: str, path: str | None) -> str | None:
    """``name`` as given when it holds a separator, else from :func:`bin_dir` first, then ``path``."""
    if os.sep in name or (os.altsep and os.altsep in name):
        return name if os.path.exists(name) else None
    search = os.pathsep.join(p for p in (bin_dir(), path or "") if p)
    return shutil.which(name, path=search)


_PYTHON_NAME = re.compile(r"^python(\d+(\.\d+)?)?[tdm]*(\.exe)?$")
_SHEBANG_MAX = 512


def python_of(program: str, path: str | None) -> str | None:
    """The Python interpreter that will run ``program``: itself, or the one its ``#!`` line
    names (``#!/usr/bin/env python3`` looked up on ``path``). ``None`` when it is not Python."""
    if _PYTHON_NAME.match(os.path.basename(program)):
        return program
    try:
        with open(program, "rb") as fh:
            head = fh.read(_SHEBANG_MAX)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    words = line.split()
    if not words:
        return None
    interpreter = words[0]
    if os.path.basename(interpreter) == "env":
        rest = [w for w in words[1:] if not w.startswith("-")]
        if not rest:
            return None
        found = shutil.which(rest[0], path=path)
        interpreter = found or rest[0]
    return interpreter if _PYTHON_NAME.match(os.path.basename(interpreter)) else None


PROBE = ("import importlib.util as u, sys; "
         "sys.exit(0 if u.find_spec('metal_guard') and u.find_spec('_metal_guard_boot') else 3)")


def can_import_metal_guard(python: str, env: dict[str, str]) -> bool:
    """True when ``python`` (started with ``env``) can import metal-guard and its boot module."""
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        return True  # this very interpreter: it is running metal-guard now
    probe_env = {k: v for k, v in env.items() if k != "METALGUARD_AUTOLOAD"}
    try:
        proc = subprocess.run([python, "-c", PROBE], env=probe_env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def _debug() -> bool:
    from metal_guard.settings import get_settings

    return get_settings().debug


def run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("metal-guard run: no command given (usage: metal-guard run -- <cmd> [args...])",
              file=sys.stderr)
        return EXIT_USAGE
    env, use_shim = build_env(args)
    program = resolve_command(command[0], env.get("PATH"))
    if program is None:
        print(f"metal-guard run: command not found: {command[0]} (looked in {bin_dir()} and PATH)",
              file=sys.stderr)
        return EXIT_NOT_FOUND
    python = python_of(program, env.get("PATH"))
    if python is not None and not can_import_metal_guard(python, env):
        print(f"metal-guard run: warning: {command[0]} runs on {python}, which cannot import "
              f"metal-guard: it will run UNGUARDED (install metal-guard into that environment, or "
              f"use the metal-guard next to it)", file=sys.stderr)
    if use_shim and _debug():
        print(f"metal-guard run: activating through the sitecustomize shim ({shim_dir()})",
              file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(program, command, env)
    except OSError as exc:
        print(f"metal-guard run: cannot execute {command[0]}: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    return 0  # pragma: no cover - execve does not return
