#!/usr/bin/env bash
# Cluster mode, hello world: Puma 5.6 `-w 2 -t 5:5` vs Hyperion `-w 2 -t 5`
# (reuseport and share), one run of ../shared/bench/compare.
set -euo pipefail
cd "$(dirname "$0")/.."
bin/setup >&2
shared=${SHARED:-../shared}
exec "$shared/bench/compare" "$shared/bench/apps/hello.ru" \
  puma_w2='puma -w 2 -t 5:5 -b tcp://127.0.0.1:{port} {rackup}' \
  hyperion_w2='bin/hyperion -w 2 -t 5 -b 127.0.0.1 -p {port} {rackup}' \
  hyperion_w2_share='env HYPERION_WORKER_MODEL=share bin/hyperion -w 2 -t 5 -b 127.0.0.1 -p {port} {rackup}'
