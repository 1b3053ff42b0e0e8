#!/usr/bin/env bash
# 10 MiB POST upload throughput and server memory: Puma vs Hyperion (or any
# servers), one run, servers one after another on free ports.
#
#   bench/upload.sh [NAME='CMD' ...]
#
#   e.g. bench/upload.sh puma='puma -t 5:5 -b tcp://127.0.0.1:{port} {rackup}' \
#                        hyperion='bin/hyperion -t 5 -b 127.0.0.1 -p {port} {rackup}'
#   (with no NAME='CMD' pairs, exactly those two servers are used)
#
# Env: DURATION=10 (s)  CONNS=4  ROUNDS=1  WARMUP=2 (s)  BOOT_TIMEOUT=60 (s)
#      RACKUP=../shared/bench/apps/upload.ru  WRK_SCRIPT=../shared/bench/wrk/post_10m.lua
#      BODY_MIB=10 (body size the lua script sends; used for MiB/s)
#
# Same conventions as ../shared/bench/compare ({port}/{rackup} substituted, CMD
# run from the repo root, first server is the ratio reference), but with its own
# loop so it knows the server pid: `setsid bash -c "exec CMD" &` makes $! the
# server process itself (bin/hyperion and puma exec into ruby). While wrk runs
# (warm-up + measured run) VmRSS of that pid is sampled every 100 ms (bounded);
# VmHWM (kernel peak) is also reported. Each server is killed by its pid/group.
# Output, one line per server:
#   NAME rps=.. upload_MiB_s=.. p50_ms=.. p99_ms=.. errors=.. rss_before_mb=.. peak_rss_mb=.. vmhwm_mb=..
# then "ratio NAME/REF rps=.. p99=.. peak_rss=.." (p99 = REF/NAME, > 1 means lower tail;
# peak_rss = NAME/REF, < 1 means less memory).
set -u
cd "$(dirname "$0")/.."
shared=${SHARED:-../shared}
command -v wrk >/dev/null || { echo "upload.sh: wrk not found" >&2; exit 2; }
DURATION=${DURATION:-10}; CONNS=${CONNS:-4}; ROUNDS=${ROUNDS:-1}; WARMUP=${WARMUP:-2}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-60}; BODY_MIB=${BODY_MIB:-10}
rackup=$(readlink -f "${RACKUP:-$shared/bench/apps/upload.ru}")
WRK_SCRIPT=$(readlink -f "${WRK_SCRIPT:-$shared/bench/wrk/post_10m.lua}")
[ -f "$rackup" ] && [ -f "$WRK_SCRIPT" ] || { echo "upload.sh: missing $rackup or $WRK_SCRIPT" >&2; exit 2; }
if [ $# -eq 0 ]; then
  set -- puma='puma -t 5:5 -b tcp://127.0.0.1:{port} {rackup}' \
         hyperion='bin/hyperion -t 5 -b 127.0.0.1 -p {port} {rackup}'
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() { local p=$1 pid=$2 t=0
  while ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.2; t=$((t+1)); [ $t -gt $((BOOT_TIMEOUT*5)) ] && return 1
  done; return 0; }
to_ms() { awk -v v="$1" 'BEGIN{ if (v ~ /us$/) {sub(/us$/,"",v); print v/1000} else if (v ~ /ms$/) {sub(/ms$/,"",v); print v+0} else if (v ~ /s$/) {sub(/s$/,"",v); print v*1000} else print 0 }'; }
status_kb() { # pid field -> kB (0 if gone)
  local k v rest
  while read -r k v rest; do [ "$k" = "$2:" ] && { echo "$v"; return; }; done 2>/dev/null </proc/"$1"/status
  echo 0; }
server_pid() { # bash exec'd into CMD; if CMD is itself a shell wrapper, take its child
  local pid=$1 comm kids i
  for i in 1 2 3 4 5; do
    comm=$(cat /proc/"$pid"/comm 2>/dev/null) || break
    case $comm in bash|sh|dash|env|timeout) ;; *) break ;; esac
    kids=$(cat /proc/"$pid"/task/"$pid"/children 2>/dev/null); [ -n "$kids" ] || break
    pid=${kids%% *}
  done; echo "$pid"; }
sampler() { # pid outfile stopfile max_samples: max VmRSS (kB) every 100 ms
  local pid=$1 out=$2 stop=$3 n=$4 i=0 max=0 k v rest
  while [ $i -lt "$n" ] && [ ! -e "$stop" ]; do
    while read -r k v rest; do
      [ "$k" = "VmRSS:" ] && { [ "$v" -gt "$max" ] && max=$v; break; }
    done 2>/dev/null </proc/"$pid"/status || break
    echo "$max" >"$out"; sleep 0.1; i=$((i+1))
  done; }
stop_server() { local pid=$1 i
  kill -TERM -- -"$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- -"$pid" 2>/dev/null; wait "$pid" 2>/dev/null; }

run_one() { # name cmd round
  local name=$1 cmd=$2 r=$3 port pid spid out before peak hwm
  port=$(free_port)
  cmd=${cmd//\{port\}/$port}; cmd=${cmd//\{rackup\}/$rackup}
  setsid bash -c "exec $cmd" >"$tmp/$name.log" 2>&1 & pid=$!
  if ! wait_port "$port" "$pid"; then
    echo "$name: server did not open port $port; last log lines:" >&2; tail -5 "$tmp/$name.log" >&2
    stop_server "$pid"; return 1; fi
  spid=$(server_pid "$pid")
  sleep 0.5; before=$(status_kb "$spid" VmRSS)
  rm -f "$tmp/stop"; echo 0 >"$tmp/peak"
  sampler "$spid" "$tmp/peak" "$tmp/stop" $(( (WARMUP + DURATION + 30) * 10 )) & local sp=$!
  [ "$WARMUP" -gt 0 ] && timeout $((WARMUP + 30)) wrk -t1 -c"$CONNS" -d"${WARMUP}s" -s "$WRK_SCRIPT" "http://127.0.0.1:$port/" >/dev/null 2>&1
  out=$(timeout $((DURATION + 30)) wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$WRK_SCRIPT" "http://127.0.0.1:$port/" 2>&1)
  touch "$tmp/stop"; wait "$sp"
  peak=$(cat "$tmp/peak"); hwm=$(status_kb "$spid" VmHWM)
  kill -0 "$spid" 2>/dev/null || out="$out SERVER-DIED"
  stop_server "$pid"
  local rps p50 p99 errs
  rps=$(awk '/Requests\/sec/{print $2}' <<<"$out"); rps=${rps:-0}
  p50=$(to_ms "$(awk '$1=="50%"{print $2}' <<<"$out")")
  p99=$(to_ms "$(awk '$1=="99%"{print $2}' <<<"$out")")
  errs=$(awk '/Socket errors/{e=$4+$6+$8+$10} /Non-2xx/{n=$5} END{print (e+0)+(n+0)}' <<<"$out")
  grep -q SERVER-DIED <<<"$out" && echo "$name: server died during round $r" >&2
  echo "$name $rps $p50 $p99 $errs $before $peak $hwm" >>"$tmp/results"
}

names=(); cmds=()
for spec in "$@"; do
  case $spec in *=*) ;; *) echo "usage: bench/upload.sh [NAME='CMD' ...] (bad: $spec)" >&2; exit 2 ;; esac
  names+=("${spec%%=*}"); cmds+=("${spec#*=}")
done
echo "# upload: wrk -t1 -c$CONNS -d${DURATION}s -s $(basename "$WRK_SCRIPT") (${BODY_MIB} MiB/request), rounds=$ROUNDS, rackup $rackup"
for ((r=1; r<=ROUNDS; r++)); do
  for i in "${!names[@]}"; do run_one "${names[$i]}" "${cmds[$i]}" "$r" || true; done
done
[ -s "$tmp/results" ] || { echo "upload.sh: no results" >&2; exit 1; }
# best round per server by rps (its latencies); RSS before = first round, peaks = max over rounds
awk -v mib="$BODY_MIB" '
  { n=$1; if (!(n in before)) before[n]=$6
    if ($7+0 > peak[n]+0) peak[n]=$7; if ($8+0 > hwm[n]+0) hwm[n]=$8
    if (!(n in best) || $2+0 > best[n]+0) { best[n]=$2; p50[n]=$3; p99[n]=$4; err[n]=$5 } }
  END { for (n in best) printf "%s rps=%.2f upload_MiB_s=%.1f p50_ms=%.2f p99_ms=%.2f errors=%d rss_before_mb=%.1f peak_rss_mb=%.1f vmhwm_mb=%.1f\n",
          n, best[n], best[n]*mib, p50[n], p99[n], err[n], before[n]/1024, peak[n]/1024, hwm[n]/1024 }' "$tmp/results" >"$tmp/best"
ref=${names[0]}
for n in "${names[@]}"; do grep "^$n " "$tmp/best" || echo "$n FAILED"; done
refline=$(grep "^$ref " "$tmp/best") || exit 1
for n in "${names[@]:1}"; do
  line=$(grep "^$n " "$tmp/best") || continue
  awk -v a="$refline" -v b="$line" -v n="$n" -v r="$ref" 'function get(s,k,  i,f,kv){ split(s,f," "); for(i in f){ split(f[i],kv,"="); if(kv[1]==k) return kv[2]+0 } return 0 }
    BEGIN{ ar=get(a,"rps"); br=get(b,"rps"); ap=get(a,"p99_ms"); bp=get(b,"p99_ms"); am=get(a,"peak_rss_mb"); bm=get(b,"peak_rss_mb")
      printf "ratio %s/%s rps=%.2f p99=%.2f peak_rss=%.2f\n", n, r, (ar>0? br/ar:0), (bp>0? ap/bp:0), (am>0? bm/am:0) }'
done
