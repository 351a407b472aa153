"""``metal-guard serve``: an OpenAI-compatible server that survives its own crash.

A small front process (stdlib only, never imports MLX) binds the user's ``--host/--port`` and
forwards every request to the real server (``mlx_lm.server`` / ``mlx_vlm.server``), which runs
as a guarded child on a private loopback port. When the child dies, the front answers 503,
classifies the death, counts it with the circuit breaker and starts a new child.

Modules, one concern each:

* :mod:`.command` — recognising and rewriting the child's command line;
* :mod:`.replies` — OpenAI-shaped error bodies and SSE error events;
* :mod:`.trampoline` — the child's first step: tie its life to the front's, then ``exec``;
* :mod:`.child` — one child process: start, log pump, readiness, stop, crash classification;
* :mod:`.supervisor` — which child serves, respawn policy (gate, breaker, cadence, backoff);
* :mod:`.proxy` — forwarding one request, streaming included;
* :mod:`.front` — the HTTP server and its own routes; :mod:`.metrics` — status and metrics.

Nothing is imported here: ``import metal_guard.serve`` costs nothing.
"""
