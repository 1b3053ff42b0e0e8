#!/usr/bin/env bash
# What a request costs the server, for two builds side by side: hello over
# h2c (h2load -c 10 -m 10) and HTTP/1.1 (h2load --h1 -c 10), each build in
# turn, ROUNDS times. Besides req/s (which a shared, noisy machine moves a
# lot) it prints the CPU time the server process used per request, in all and
# on its tokio I/O thread alone (from /proc, so no perf counters needed),
# which moves much less.
#
#   bench/h2_cost.sh BASE_CHECKOUT [THIS_CHECKOUT]
#
# Each checkout must have its extension built (rake compile). Env: ROUNDS=3,
# N=100000 requests per measurement, SHARED=../shared (from this checkout).
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/lib.sh" # free_port, wait_port (before any cd: $0 may be relative)
base=$(readlink -f "${1:?usage: bench/h2_cost.sh BASE_CHECKOUT [THIS_CHECKOUT]}")
this=$(readlink -f "${2:-$(dirname "$0")/..}")
cd "$this"
shared=${SHARED:-../shared}
rackup=$(readlink -f "$shared/bench/apps/hello.ru") || { echo "no $shared/bench/apps/hello.ru; set SHARED"; exit 1; }
ROUNDS=${ROUNDS:-3}; N=${N:-100000}
ticks() { awk '{print $14 + $15}' "$1"; } # utime + stime of a /proc stat file
io_stat() { for t in /proc/"$1"/task/*; do [ "$(cat "$t/comm")" = hyperion-io ] && echo "$t/stat"; done; return 0; }
pid=""
trap '[ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' EXIT
hz=$(getconf CLK_TCK)
for round in $(seq 1 "$ROUNDS"); do
  for build in base:"$base" this:"$this"; do
    name=${build%%:*}; dir=${build#*:}
    port=$(free_port)
    "$dir/bin/hyperion" -t 5 -b "tcp://127.0.0.1:$port" "$rackup" >/dev/null 2>&1 & pid=$!
    wait_port "$port"
    for proto in h2c h1; do
      flags=(-c 10 -m 10); [ "$proto" = h1 ] && flags=(--h1 -c 10 -m 1)
      h2load "${flags[@]}" -n 20000 "http://127.0.0.1:$port/" >/dev/null 2>&1
      io=$(io_stat "$pid")
      all0=$(ticks /proc/$pid/stat); io0=$(ticks "$io")
      out=$(h2load "${flags[@]}" -n "$N" "http://127.0.0.1:$port/" 2>&1)
      all1=$(ticks /proc/$pid/stat); io1=$(ticks "$io")
      printf '%s %-4s %-3s %8s req/s  cpu/req %5.1f us  io thread/req %5.1f us  (%s)\n' "$round" "$name" "$proto" \
        "$(awk '/^finished in/{printf "%d", $4}' <<<"$out")" \
        "$(echo "($all1 - $all0) * 1000000 / $hz / $N" | bc -l)" \
        "$(echo "($io1 - $io0) * 1000000 / $hz / $N" | bc -l)" \
        "$(grep -o '[0-9]* succeeded, [0-9]* failed' <<<"$out" | head -1)"
    done
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  done
done
