#!/usr/bin/env bash
# Where a worker's CPU goes, thread by thread, under wrk: starts
# `bin/hyperion -t THREADS` on APP (a rackup in ../shared/bench/apps), warms
# it up 3 s, then reads /proc/PID/task/*/ before and after 8 s of
# `wrk -t1 -c50` and prints, for each thread that ran, its share of a core
# and its voluntary / involuntary context switches and minor faults.
# Voluntary switches on the app thread that does the work mean it blocked
# (no job, a lock, I/O); see docs/architecture.md, "Where a request's time
# goes". Extra NAME=VALUE arguments go to the server's environment
# (e.g. MALLOC_ARENA_MAX=16).
#
#   bench/thread_cpu.sh 5 sinatra.ru [NAME=VALUE ...]
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/lib.sh" # free_port, wait_port (before any cd: $0 may be relative)
threads=${1:?usage: bench/thread_cpu.sh THREADS APP [NAME=VALUE ...]}
app=${2:?usage: bench/thread_cpu.sh THREADS APP [NAME=VALUE ...]}
shift 2
cd "$(dirname "$0")/.."
shared=${SHARED:-../shared}
tmp=$(mktemp -d)
port=$(free_port)
env "$@" bin/hyperion -t "$threads" -b 127.0.0.1 -p "$port" "$shared/bench/apps/$app" >"$tmp/server.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$tmp"' EXIT
wait_port "$port" "$pid" || { cat "$tmp/server.log" >&2; exit 1; }
wrk -t1 -c50 -d3s "http://127.0.0.1:$port/" >/dev/null

# tid comm cpu_ticks minor_faults voluntary involuntary
snapshot() {
  for task in /proc/"$pid"/task/*; do
    printf '%s %s %s %s\n' "$(basename "$task")" "$(tr ' ' _ <"$task/comm")" \
      "$(awk '{print $14 + $15, $10}' "$task/stat")" \
      "$(awk '/^(voluntary|nonvoluntary)_ctxt_switches/ {printf "%s ", $2}' "$task/status")"
  done | sort
}
wrk -t1 -c50 -d10s "http://127.0.0.1:$port/" >"$tmp/wrk.txt" &
wrk_pid=$!
sleep 1
snapshot >"$tmp/before"
sleep 8
snapshot >"$tmp/after"
wait "$wrk_pid"
grep -E 'Requests/sec' "$tmp/wrk.txt"
ticks=$(getconf CLK_TCK)
join "$tmp/before" "$tmp/after" | awk -v hz="$ticks" '{
  cpu = ($8 - $3) / hz / 8 * 100
  if (cpu > 0 || $10 - $5 > 10)
    printf "%-8s %-18s cpu=%5.1f%% voluntary=%d involuntary=%d minflt=%d\n", $1, $2, cpu, $10 - $5, $11 - $6, $9 - $4
}'
