#!/usr/bin/env bash
# Hello-world throughput and latency: Puma 5.6 vs Hyperion at 5, 1 and 16
# threads, one run of ../shared/bench/compare (servers alternate, best round
# of ROUNDS reported). Needs puma and wrk (apt-get install -y puma wrk).
set -euo pipefail
cd "$(dirname "$0")/.."
bin/setup >&2
shared=${SHARED:-../shared}
exec "$shared/bench/compare" "$shared/bench/apps/hello.ru" \
  puma='puma -t 5:5 -b tcp://127.0.0.1:{port} {rackup}' \
  hyperion='bin/hyperion -t 5 -b 127.0.0.1 -p {port} {rackup}' \
  hyperion_t1='bin/hyperion -t 1 -b 127.0.0.1 -p {port} {rackup}' \
  hyperion_t16='bin/hyperion -t 16 -b 127.0.0.1 -p {port} {rackup}'
