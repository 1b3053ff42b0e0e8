#!/usr/bin/env bash
# Restarts under load: wrk runs 12 s against `hyperion -w 2` (keep-alive
# connections, hello app); USR2 (hot restart) at 3 s and USR1 (phased) at 7 s.
# Prints wrk's totals, its socket errors and non-2xx count, and the master log.
# Usage: bench/restart.sh [connections]
set -euo pipefail
cd "$(dirname "$0")/.."
connections=${1:-32}
tmp=$(mktemp -d)
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$tmp"' EXIT
HYPERION_LOG=warn bin/hyperion -w 2 -t 5 -b 127.0.0.1 -p 0 ../shared/bench/apps/hello.ru > "$tmp/server.log" 2>&1 &
server=$!
for _ in $(seq 100); do grep -q "all 2 workers serving" "$tmp/server.log" && break; sleep 0.1; done
port=$(grep -o 'listening on http://[0-9.]*:[0-9]*' "$tmp/server.log" | grep -o '[0-9]*$')
(sleep 3; kill -${FIRST:-USR2} "$server"; sleep 4; kill -${SECOND:-USR1} "$server") &
wrk -t 2 -c "$connections" -d 12s "http://127.0.0.1:$port/" | grep -E "requests in|Socket errors|Non-2xx|Requests/sec" || true
echo "(no 'Socket errors' or 'Non-2xx' line above means none)"
grep -E "hot restart|phased|serving|left" "$tmp/server.log"
