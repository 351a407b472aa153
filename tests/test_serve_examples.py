"""The ``metal-guard serve`` service examples (launchd plist, systemd unit) say what docs/serve.md
says: the command is one ``serve`` accepts, restarts happen only on failure and not too soon."""

from __future__ import annotations

import configparser
import plistlib
import shlex
from pathlib import Path

from metal_guard.cli import EXIT_OK, build_parser
from metal_guard.serve.command import parse_command

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _serve_args(argv: list[str]) -> tuple[list[str], list[str]]:
    i = argv.index("serve")
    rest = argv[i + 1:]
    j = rest.index("--")
    return rest[:j], rest[j + 1:]


def test_launchd_plist_runs_serve_and_restarts_only_on_failure() -> None:
    plist = plistlib.loads((EXAMPLES / "launchd" / "com.example.mlx-serve.plist").read_bytes())
    argv = plist["ProgramArguments"]
    assert argv[1:4] == ["-m", "metal_guard", "serve"]
    options, command = _serve_args(argv)
    args = build_parser(["metal_guard.cli.serve"]).parse_args(["serve", *options, "--", *command])
    assert args.func.__module__ == "metal_guard.cli.serve"
    cmd = parse_command(command)
    assert (cmd.host, cmd.port, cmd.family) == ("127.0.0.1", 8080, "mlx_lm")
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # exit 0 (SIGTERM) stays stopped
    assert plist["ThrottleInterval"] >= 60
    assert plist["Label"] in plist["StandardOutPath"]


def test_systemd_unit_runs_serve_restarts_on_failure_and_signals_the_front_only() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(EXAMPLES / "systemd" / "metal-guard-serve.service")
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/metal-guard") and argv[1] == "serve"
    _, command = _serve_args(argv)
    cmd = parse_command(command)
    assert cmd.family == "mlx_lm" and cmd.model
    assert service["Restart"] == "on-failure"  # 2 / 4 / 12 restart; a clean stop (0) does not
    assert int(service["RestartSec"]) >= 60
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    assert EXIT_OK == 0
