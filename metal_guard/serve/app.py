"""Running the pair: bind the front, start the supervisor, handle signals, return the exit code.

SIGTERM / SIGINT (and SIGHUP) stop the front cleanly: no new connections, the children get
SIGTERM and ``stop_grace_sec`` to exit (then SIGKILL), and the exit code is 0. When the
supervisor decides the front must end (breaker open, panic cooldown, starts that keep
failing), :func:`serve` returns its code.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from metal_guard.serve.command import ServerCommand
from metal_guard.serve.front import FrontServer
from metal_guard.serve.logsink import LogSink, default_log_path
from metal_guard.serve.supervisor import ServeOptions, Supervisor

log = logging.getLogger("metal_guard.serve")

__all__ = ["serve"]


def serve(command: ServerCommand, options: ServeOptions, *, log_path: Path | None = None,
          upstream_timeout: float = 600.0, max_body_bytes: int = 64 << 20,
          install_signals: bool = True) -> int:
    """Run the front until a signal or a supervisor decision; return the exit code."""
    from metal_guard.cli import EXIT_OK

    sink = LogSink(log_path or default_log_path(command.host, command.port))
    shutting_down = threading.Event()
    httpd: FrontServer | None = None

    def end() -> None:
        if shutting_down.is_set():
            return
        shutting_down.set()
        if httpd is not None:
            threading.Thread(target=httpd.shutdown, name="metal-guard-serve-shutdown",
                             daemon=True).start()

    supervisor = Supervisor(command, options, sink, on_exit=lambda code: end())
    try:
        httpd = FrontServer((command.host, command.port), supervisor,
                            upstream_timeout=upstream_timeout, max_body_bytes=max_body_bytes)
    except OSError as exc:
        sink.close()
        raise OSError(f"cannot listen on {command.host}:{command.port}: {exc}") from exc

    previous: dict[signal.Signals, object] = {}
    if install_signals and threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("metal-guard serve: %s received; stopping", signal.Signals(signum).name)
            end()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            previous[sig] = signal.signal(sig, on_signal)
    host, port = httpd.listen
    print(f"metal-guard serve: listening on http://{host}:{port} "
          f"(server log: {sink.path})", file=sys.stderr, flush=True)
    supervisor.start()
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        supervisor.stop()
        httpd.server_close()
        sink.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
    code = supervisor.exit_code
    return EXIT_OK if code is None else code
