#!/usr/bin/env bash
# Worker balance in cluster mode: wrk with keep-alive connections against
# `hyperion -w 2` (and -w 4) serving an app that answers with its pid; a wrk
# Lua script tallies responses per pid and prints busiest/idlest.
# Usage: bench/balance.sh [reuseport|share] [connections] [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-reuseport}
connections=${2:-64}
seconds=${3:-10}
tmp=$(mktemp -d)
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$tmp"' EXIT
echo 'run ->(env) { [200, {"content-type" => "text/plain"}, [Process.pid.to_s]] }' > "$tmp/pid.ru"
cat > "$tmp/tally.lua" <<'LUA'
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) tally = {} end
function response(status, headers, body) tally[body] = (tally[body] or 0) + 1 end
function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for pid, n in pairs(thread:get("tally")) do total[pid] = (total[pid] or 0) + n end
  end
  local max, min = 0, math.huge
  for pid, n in pairs(total) do
    io.write(string.format("  pid %s: %d requests\n", pid, n))
    if n > max then max = n end
    if n < min then min = n end
  end
  io.write(string.format("  busiest/idlest: %.3f\n", max / min))
end
LUA
for workers in ${WORKERS:-2 4}; do
  HYPERION_WORKER_MODEL=$model HYPERION_LOG=warn bin/hyperion -w "$workers" -t 5 -b 127.0.0.1 -p 0 "$tmp/pid.ru" \
    > "$tmp/server.log" 2>&1 &
  server=$!
  for _ in $(seq 100); do grep -q "all $workers workers serving" "$tmp/server.log" && break; sleep 0.1; done
  port=$(grep -o 'listening on http://[0-9.]*:[0-9]*' "$tmp/server.log" | grep -o '[0-9]*$')
  echo "== -w $workers, $model, wrk -t 2 -c $connections -d ${seconds}s (keep-alive)"
  wrk -t 2 -c "$connections" -d "${seconds}s" -s "$tmp/tally.lua" "http://127.0.0.1:$port/" | grep -E "Requests/sec|pid|busiest"
  kill "$server"; wait "$server" || true
done
