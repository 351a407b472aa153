"""The pure parts of ``metal-guard serve``: command rewriting, error bodies, log tail and sink."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from metal_guard.serve import replies
from metal_guard.serve.command import CommandError, parse_command
from metal_guard.serve.logsink import MAX_LINE_BYTES, LogSink, Tail


@pytest.mark.parametrize("argv, prefix, family", [
    (["mlx_lm.server", "--model", "m"], ("mlx_lm.server",), "mlx_lm"),
    (["/opt/venv/bin/mlx_vlm.server", "--model", "m"], ("/opt/venv/bin/mlx_vlm.server",), "mlx_vlm"),
    (["mlx_lm", "server", "--model", "m"], ("mlx_lm", "server"), "mlx_lm"),
    (["python", "-m", "mlx_lm.server", "--model", "m"], ("python", "-m", "mlx_lm", "server"), "mlx_lm"),
    (["/usr/bin/python3.11", "-m", "mlx_lm", "server", "--model", "m"],
     ("/usr/bin/python3.11", "-m", "mlx_lm", "server"), "mlx_lm"),
    (["python3", "-m", "mlx_vlm.server", "--model", "m"], ("python3", "-m", "mlx_vlm.server"), "mlx_vlm"),
])
def test_recognised_forms(argv: list[str], prefix: tuple[str, ...], family: str) -> None:
    cmd = parse_command(["--", *argv])
    assert cmd.prefix == prefix and cmd.family == family and cmd.model == "m"
    assert (cmd.host, cmd.port) == ("127.0.0.1", 8080)


def test_host_and_port_move_to_the_front_and_the_child_gets_a_private_port() -> None:
    cmd = parse_command(["mlx_lm.server", "--host", "0.0.0.0", "--model=/m", "--port=9000",
                         "--max-tokens", "8"])
    assert (cmd.host, cmd.port, cmd.model) == ("0.0.0.0", 9000, "/m")
    argv = cmd.child_argv(41234)
    assert argv == ["mlx_lm.server", "--model=/m", "--max-tokens", "8",
                    "--host", "127.0.0.1", "--port", "41234"]
    # the user's host/port appear nowhere in the child's command line
    assert "0.0.0.0" not in argv and "9000" not in " ".join(argv)


def test_repeated_port_options_are_all_removed_last_wins() -> None:
    cmd = parse_command(["mlx_lm.server", "--port", "1", "--port", "2"])
    assert cmd.port == 2 and "--port" not in cmd.args
    assert cmd.model is None and cmd.model_id == "mlx_lm.server:default"


@pytest.mark.parametrize("argv, fragment", [
    ([], "no server command"),
    (["llama-server", "-m", "x"], "cannot supervise"),
    (["python", "-m", "http.server"], "cannot supervise"),
    (["python", "script.py"], "cannot supervise"),
    (["mlx_lm.server", "--port", "http"], "must be a number"),
    (["mlx_lm.server", "--port", "70000"], "between 0 and 65535"),
    (["mlx_lm.server", "--port"], "needs a value"),
    (["mlx_lm.server", "--host", "a b"], "not a host"),
    (["mlx_lm.server", "--host", "x\r\nInjected: 1"], "not a host"),
    (["mlx_lm.server", "--model", "a\x00b"], "NUL"),
    (["mlx_lm.server", "--model", ""], "empty"),
])
def test_bad_commands_are_refused_clearly(argv: list[str], fragment: str) -> None:
    with pytest.raises(CommandError, match=fragment):
        parse_command(argv)


def test_error_body_has_the_openai_shape_and_cleans_the_message() -> None:
    body = replies.error_body("died\r\nX-Evil: 1" + "x" * 2000, code="server_restarting",
                              error_class="worker_killed", signal=None)
    err = body["error"]
    assert set(err) == {"message", "type", "code", "param", "error_class"}
    assert err["type"] == "server_error" and err["param"] is None
    assert "\r" not in err["message"] and "\n" not in err["message"]
    assert len(err["message"]) == replies.MAX_MESSAGE_CHARS
    event = replies.sse_error_event("gone", code="c")
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:])["error"]["message"] == "gone"


@pytest.mark.parametrize("seconds, expected", [
    (None, "1"), (0, "1"), (0.2, "1"), (3.01, "4"), (float("nan"), "1"), (1e9, "86400"),
])
def test_retry_after_is_whole_bounded_seconds(seconds: float | None, expected: str) -> None:
    assert replies.retry_after_value(seconds) == expected


def test_tail_keeps_bounded_recent_lines() -> None:
    tail = Tail(lines=3)
    tail.feed(b"one\ntwo\nthr")
    tail.feed(b"ee\nfour\n")
    assert tail.text() == "two\nthree\nfour"
    tail.feed(b"z" * (MAX_LINE_BYTES * 3))  # a line that never ends is cut, not kept whole
    assert all(len(line) <= MAX_LINE_BYTES for line in tail.text().splitlines())
    tail.feed(b"\xff\xfebinary\n")
    assert tail.text().splitlines()[-1].endswith("binary")


def test_log_sink_is_private_rotates_and_refuses_symlinks(tmp_path: Path) -> None:
    path = tmp_path / "serve" / "h-1.log"
    sink = LogSink(path, max_bytes=4096)
    sink.write(b"a" * 3000)
    sink.write(b"b" * 3000)  # over the cap: the first part moves to .1
    sink.close()
    assert path.read_bytes() == b"b" * 3000
    assert (tmp_path / "serve" / "h-1.log.1").read_bytes() == b"a" * 3000
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700

    target = tmp_path / "victim"
    target.write_bytes(b"keep")
    link = tmp_path / "serve" / "link.log"
    link.symlink_to(target)
    evil = LogSink(link)
    evil.write(b"overwrite")  # never raises, never follows the link
    evil.close()
    assert target.read_bytes() == b"keep"


def test_trampoline_refuses_when_the_front_is_gone() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "metal_guard.serve.trampoline", "--ppid", "1",
                           "--fd", "-1", "--", "/bin/echo", "started"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "started" not in proc.stdout
    assert "front is gone" in proc.stderr


def test_serve_usage_errors_exit_64() -> None:
    from metal_guard.cli import main

    assert main(["serve"]) == 64
    assert main(["serve", "--", "llama-server"]) == 64
    assert main(["serve", "--ready-timeout", "-1", "--", "mlx_lm.server"]) == 64


def test_exit_code_of_an_open_breaker_is_in_the_table() -> None:
    from metal_guard.cli import EXIT_CODES, EXIT_SERVE_BREAKER

    assert EXIT_SERVE_BREAKER == 12 and "breaker" in EXIT_CODES[EXIT_SERVE_BREAKER]
