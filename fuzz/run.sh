#!/usr/bin/env bash
# Property-based fuzzing of every input Hyperion parses itself: the Host /
# authority grammar (`host[:port]`, RFC 3986) and SERVER_NAME/PORT, header
# name → env key, the request checks (limits, Host/Expect rules, transfer
# codings), the body size limit, the HTTP/2 frame-header tracker behind
# the control-frame budget (any split of the byte stream, garbage included),
# the PROXY protocol framing (v1 line, v2 length; any split, never a byte
# past the header; the header's fields are decoded by ppp, fuzzed here with
# it), the first address of an X-Forwarded-For-style header, the control
# listener's token and request heads (src/control/route.rs), and access-log
# lines built from any request text (src/access_log.rs).
# HTTP framing itself (chunks, Content-Length, request lines, HTTP/2 frames)
# is hyper's and h2's.
#
#   fuzz/run.sh [SECONDS]     (default 600)
#
# Runs the proptest properties of src/host.rs, src/limits.rs, src/body.rs,
# src/http2/frame_scanner.rs, src/proxy_protocol.rs, src/remote_address.rs,
# src/control/route.rs and src/access_log.rs over and over, each round with a
# fresh random seed and CASES cases per property, until SECONDS have passed.
# A failure stops the run and proptest prints the minimal failing input (and
# saves it under proptest-regressions/).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
cases=${CASES:-20000}
deadline=$(( $(date +%s) + seconds ))
rounds=0
cargo test --release --quiet --lib --no-run
while [ "$(date +%s)" -lt "$deadline" ]; do
  PROPTEST_CASES=$cases cargo test --release --quiet --lib -- host:: limits:: body:: http2::frame_scanner:: proxy_protocol:: remote_address:: control::route:: access_log:: >/dev/null
  rounds=$((rounds + 1))
done
echo "fuzz: $rounds rounds x $cases cases per property, ${seconds}s, no failure"
