#!/usr/bin/env bash
# TLS and HTTP/2 benchmarks, one run, servers one after another:
#  1. hello over TLS keep-alive (wrk -t1 -c50, https): Puma's ssl:// bind vs
#     Hyperion --tls-cert/--tls-key, same self-made certificate;
#  2. h2load -c 10 -m 10 hello over h2c and over TLS (h2) for Hyperion, next to
#     the bare-hyper ceiling (../shared/bench/ceiling/run, h2c, no Ruby).
# Needs wrk, puma, h2load (nghttp2-client), openssl.
#
#   bench/tls_h2.sh            env: DURATION=10 (s)  CONNS=50  H2_REQUESTS=200000
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/lib.sh" # free_port, wait_port (before any cd: $0 may be relative)
cd "$(dirname "$0")/.."
shared=${SHARED:-../shared}
DURATION=${DURATION:-10}; CONNS=${CONNS:-50}; H2_REQUESTS=${H2_REQUESTS:-200000}
rackup=$(readlink -f "$shared/bench/apps/hello.ru")
tmp=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
  -keyout "$tmp/key.pem" -out "$tmp/cert.pem" 2>/dev/null

start() { # name port cmd...
  local name=$1 port=$2; shift 2
  "$@" >"$tmp/$name.log" 2>&1 & pids+=($!)
  wait_port "$port" || { echo "$name did not start"; tail -5 "$tmp/$name.log"; exit 1; }
}
stop_last() { kill -TERM "${pids[-1]}" 2>/dev/null || true; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'; }
wrk_line() { # name url
  local out rps p99
  wrk -t1 -c"$CONNS" -d2s "$2" >/dev/null 2>&1 || true
  out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$2" 2>&1)
  rps=$(awk '/Requests\/sec/{print $2}' <<<"$out"); p99=$(awk '$1=="99%"{print $2}' <<<"$out")
  echo "$1 rps=$rps p99=$p99"
}
h2_line() { # name url
  local out
  out=$(h2load -n "$H2_REQUESTS" -c 10 -m 10 "$2" 2>&1)
  echo "$1 $(awk '/^finished in/{print "rps=" $4}' <<<"$out") $(grep -o '[0-9]* succeeded, [0-9]* failed' <<<"$out" | head -1)"
}

echo "# TLS hello keep-alive: wrk -t1 -c$CONNS -d${DURATION}s"
port=$(free_port)
start puma "$port" puma -t 5:5 -b "ssl://127.0.0.1:$port?key=$tmp/key.pem&cert=$tmp/cert.pem&verify_mode=none" "$rackup"
puma_line=$(wrk_line puma_tls "https://127.0.0.1:$port/"); echo "$puma_line"; stop_last
port=$(free_port)
start hyperion "$port" bin/hyperion -t 5 -b 127.0.0.1 -p "$port" --tls-cert "$tmp/cert.pem" --tls-key "$tmp/key.pem" "$rackup"
hyp_line=$(wrk_line hyperion_tls "https://127.0.0.1:$port/"); echo "$hyp_line"
echo "# h2load -n $H2_REQUESTS -c 10 -m 10"
h2_line hyperion_h2_tls "https://127.0.0.1:$port/"; stop_last
port=$(free_port)
start hyperion_h2c "$port" bin/hyperion -t 5 -b 127.0.0.1 -p "$port" "$rackup"
h2_line hyperion_h2c "http://127.0.0.1:$port/"; stop_last
port=$(free_port)
start ceiling "$port" "$shared/bench/ceiling/run" "$port"
h2_line ceiling_h2c "http://127.0.0.1:$port/"; stop_last
awk -v a="$puma_line" -v b="$hyp_line" 'BEGIN{split(a,A," "); split(b,B," "); sub("rps=","",A[2]); sub("rps=","",B[2]); printf "ratio hyperion_tls/puma_tls rps=%.2f\n", B[2]/A[2]}'
