"""The child's command line: which server it is, where the user wants it, and the rewrite.

``metal-guard serve -- mlx_lm.server --model M --port 8080`` means: the *front* listens on
8080, the child runs ``mlx_lm.server --model M --host 127.0.0.1 --port <private>``. Accepted
forms (anything else is a usage error, because we could not move its port safely):

* ``mlx_lm.server ARGS`` / ``mlx_vlm.server ARGS`` (console scripts, any path);
* ``mlx_lm server ARGS`` (the ``mlx_lm`` dispatcher);
* ``python -m mlx_lm.server ARGS``, ``python -m mlx_lm server ARGS``,
  ``python -m mlx_vlm.server ARGS`` (any ``python``/``python3``/``python3.X`` path).
  ``python -m mlx_lm.server`` is run as ``python -m mlx_lm server``: with ``-m`` the server
  module runs as ``__main__`` and the adapter (hooked on ``mlx_lm.server``) would never see it.

Pure functions only: nothing here starts a process or reads the environment.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

__all__ = ["CommandError", "ServerCommand", "parse_command"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
CHILD_HOST = "127.0.0.1"
#: Longest accepted host/model string (hostile-input bound).
MAX_VALUE_CHARS = 1024

_PYTHON_RE = re.compile(r"^python(?:3(?:\.\d+)?)?$")
_SCRIPTS = {"mlx_lm.server": "mlx_lm", "mlx_vlm.server": "mlx_vlm"}
_MODULES = {"mlx_lm.server": "mlx_lm", "mlx_vlm.server": "mlx_vlm"}
_HOST_RE = re.compile(r"^[A-Za-z0-9._:\-\[\]%]+$")


class CommandError(ValueError):
    """The command after ``--`` is not one ``serve`` can supervise."""


@dataclass(frozen=True)
class ServerCommand:
    """A recognised server command with ``--host``/``--port`` taken out."""

    prefix: tuple[str, ...]  # the program (and ``-m module`` / subcommand) part
    args: tuple[str, ...]  # the server's own arguments, without host and port
    family: str  # "mlx_lm" or "mlx_vlm"
    host: str  # where the front listens
    port: int
    model: str | None

    def child_argv(self, port: int, host: str = CHILD_HOST) -> list[str]:
        """The child's argv: the same command on a private loopback address."""
        return [*self.prefix, *self.args, "--host", host, "--port", str(int(port))]

    @property
    def model_id(self) -> str:
        """What cadence and breaker records call this server's model."""
        return self.model or f"{self.family}.server:default"


def _split_program(argv: list[str]) -> tuple[tuple[str, ...], list[str], str]:
    if not argv:
        raise CommandError("no server command given (usage: metal-guard serve [options] -- "
                           "mlx_lm.server --model MODEL [args])")
    name = os.path.basename(argv[0])
    if name in _SCRIPTS:
        return (argv[0],), argv[1:], _SCRIPTS[name]
    if name == "mlx_lm" and len(argv) > 1 and argv[1] == "server":
        return (argv[0], "server"), argv[2:], "mlx_lm"
    if _PYTHON_RE.match(name) and len(argv) > 2 and argv[1] == "-m":
        module = argv[2]
        if module == "mlx_lm.server":
            # ``-m mlx_lm.server`` runs the server as ``__main__``: the module ``mlx_lm.server``
            # is never imported, so no adapter could guard it. The dispatcher form runs the
            # same ``main()`` from the real module.
            return (argv[0], "-m", "mlx_lm", "server"), argv[3:], "mlx_lm"
        if module in _MODULES:
            return (argv[0], "-m", module), argv[3:], _MODULES[module]
        if module == "mlx_lm" and len(argv) > 3 and argv[3] == "server":
            return (argv[0], "-m", "mlx_lm", "server"), argv[4:], "mlx_lm"
    raise CommandError(
        f"cannot supervise {' '.join(argv[:3])!r}: serve runs mlx_lm.server, mlx_vlm.server, "
        "'mlx_lm server' or 'python -m mlx_lm.server' / 'python -m mlx_vlm.server'")


def _take(args: list[str], option: str) -> tuple[list[str], str | None]:
    """Remove every ``option VALUE`` / ``option=VALUE``; return the rest and the last value."""
    rest: list[str] = []
    value: str | None = None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        if arg == option:
            if i + 1 >= len(args):
                raise CommandError(f"{option} needs a value")
            value = args[i + 1]
            i += 2
            continue
        if arg.startswith(option + "="):
            value = arg[len(option) + 1:]
            i += 1
            continue
        rest.append(arg)
        i += 1
    return rest, value


def _port(value: str | None) -> int:
    if value is None:
        return DEFAULT_PORT
    try:
        port = int(value.strip(), 10)
    except ValueError:
        raise CommandError(f"--port must be a number, not {value[:40]!r}") from None
    if not 0 <= port <= 65535:
        raise CommandError(f"--port must be between 0 and 65535, not {port}")
    return port


def _host(value: str | None) -> str:
    if value is None:
        return DEFAULT_HOST
    if not value or len(value) > MAX_VALUE_CHARS or not _HOST_RE.match(value):
        raise CommandError(f"--host is not a host name or address: {value[:60]!r}")
    return value


def parse_command(argv: list[str]) -> ServerCommand:
    """Recognise ``argv`` (the part after ``--``); raise :class:`CommandError` if we cannot."""
    argv = [a for a in argv]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if any("\x00" in a for a in argv):
        raise CommandError("the command contains a NUL byte")
    prefix, args, family = _split_program(argv)
    args, host = _take(args, "--host")
    args, port = _take(args, "--port")
    model = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--model" and i + 1 < len(args):
            model = args[i + 1]
        elif arg.startswith("--model="):
            model = arg[len("--model="):]
    if model is not None and (not model.strip() or len(model) > MAX_VALUE_CHARS):
        raise CommandError("--model is empty or too long")
    return ServerCommand(prefix=prefix, args=tuple(args), family=family, host=_host(host),
                         port=_port(port), model=model)
