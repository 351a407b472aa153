"""``metal-guard run -- <cmd> [args...]``: run a command with metal-guard activated, no code change.

It sets ``METALGUARD_AUTOLOAD=1`` (plus the options given, as ``METALGUARD_*`` variables) and
``exec``s the command, so ``metal-guard run -- mlx_lm.server --model X`` is a guarded server.
Activation comes from the ``metal_guard-autoload.pth`` start-up file the wheel installs. Where
that file is missing (an editable install, an installer that drops root files), ``run`` falls
back to putting metal-guard's ``sitecustomize`` shim first on ``PYTHONPATH``; the shim runs any
``sitecustomize`` it shadows. ``--sitecustomize`` forces the shim, ``--no-sitecustomize``
forbids it.
"""

from __future__ import annotations

import argparse
import os
import shutil
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
    use_shim = args.shim if args.shim is not None else not pth_installed()
    if use_shim:
        folder = str(shim_dir())
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != folder]
        env["PYTHONPATH"] = os.pathsep.join([folder, *parts])
    return env, use_shim


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
    program = shutil.which(command[0], path=env.get("PATH")) or command[0]
    if not os.path.exists(program):
        print(f"metal-guard run: command not found: {command[0]}", file=sys.stderr)
        return EXIT_NOT_FOUND
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
