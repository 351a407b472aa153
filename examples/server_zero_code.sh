#!/usr/bin/env bash
# A guarded mlx_lm.server with zero code change: `metal-guard run -- <the usual command>`.
#
#   examples/server_zero_code.sh [MODEL]          (PORT=8089 by default)
#
# Starts the server on 127.0.0.1, asks it one chat completion, reads metal-guard's status and
# Prometheus routes, then stops it. Under metal-guard a Metal OOM answers HTTP 503 with an
# OpenAI-shaped error (and the server keeps serving) instead of 404 / a dead generation thread;
# model switches respect the load cadence and never drop the served model for a bad request;
# /health tells the truth; GET /metal-guard/status and GET /metrics are added. Set
# METALGUARD_SERVER_KEEP_ALIVE=5m to unload the model after 5 idle minutes.
# Without MODEL it uses the tiny local model `metal-guard demo` builds (offline).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
PORT="${PORT:-8089}"
MODEL="${1:-$("$PYTHON" -c 'from metal_guard.tinymodel import default_dir, ensure_tiny_lm; print(ensure_tiny_lm(default_dir("lm")))')}"
BASE="http://127.0.0.1:${PORT}"

metal-guard run -- mlx_lm.server --model "$MODEL" --host 127.0.0.1 --port "$PORT" &
SERVER=$!   # `metal-guard run` execs the command: this is the server's own pid
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT

# /health answers 503 while the server is not ready (loading, or waiting out the load cadence
# after a restart — the body says why and Retry-After says for how long); requests meanwhile get
# a 503 with Retry-After at once instead of hanging.
READY_TIMEOUT="${READY_TIMEOUT:-300}"
shown=""
for _ in $(seq 1 $((READY_TIMEOUT * 2))); do
    health="$(curl -sS "$BASE/health" 2>/dev/null || true)"
    case "$health" in
        *'"status": "ok"'*) break ;;
        *reason*) if [ "$health" != "$shown" ]; then echo "== not ready yet: $health"; shown="$health"; fi ;;
    esac
    if ! kill -0 "$SERVER" 2>/dev/null; then echo "the server exited" >&2; exit 1; fi
    sleep 0.5
done

echo "== chat completion"
curl -fsS "$BASE/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}'
echo
echo "== GET /metal-guard/status (excerpt)"
curl -fsS "$BASE/metal-guard/status" | "$PYTHON" -c '
import json, sys
snap = json.load(sys.stdin)
server = {k: snap["server"][k] for k in ("ready", "model", "model_loaded", "keep_alive_sec",
                                         "requests_total", "responses_503_total", "idle_unloads")}
print(json.dumps({"health": snap["health"], "adapters": snap["adapters"], "server": server}, indent=2))'
echo "== GET /metrics (server lines)"
curl -fsS "$BASE/metrics" | grep '^metal_guard_server_'
