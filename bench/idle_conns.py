#!/usr/bin/env python3
"""Many idle keep-alive connections: how fast they are answered, what they cost in RSS,
and what they do to normal clients' throughput.

Usage (from anywhere; server commands run from the repo root, like compare):

  bench/idle_conns.py [-n 10000] [-d 10] [-c 50] [--deadline 60] RACKUP [NAME='CMD' ...]

  e.g. bench/idle_conns.py ../shared/bench/apps/hello.ru \\
         puma='puma -t 5:5 -b tcp://127.0.0.1:{port} {rackup}' \\
         hyperion='bin/hyperion -t 5 -b 127.0.0.1 -p {port} {rackup}'
  (with no NAME='CMD' pairs, exactly those two servers are used)

For each server in turn (one at a time, free port, started as
`bash -c 'ulimit -n 65536 || ulimit -n <hard>; exec CMD'`, killed by pid after):
  1. wrk warm-up (--warmup s), then baseline `wrk -t1 -cC -dDs --latency /` with
     no idle connections;
  2. open N keep-alive connections (at most --connect-concurrency at a time); each
     sends "GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n", reads the whole response, then
     idles; everything must be answered within --deadline s (else counted missing);
  3. server VmRSS and open fds with all N open;
  4. the same wrk run while they stay open; then how many idle ones are still open.
One line per server, then ratios against the first server. Raises its own
RLIMIT_NOFILE to N+200 (caps N if the hard limit is below N+100). 127.0.0.1 only.
Failures with EADDRNOTAVAIL mean the ephemeral port range ran out.
"""
import argparse
import asyncio
import errno
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            hdrs[k.strip().lower()] = v.strip().lower()
    if "content-length" in hdrs:
        await reader.readexactly(int(hdrs["content-length"]))
    elif "chunked" in hdrs.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.read()  # delimited by close: not keep-alive
        return status, False
    return status, hdrs.get("connection") != "close"


class Conn:
    __slots__ = ("state", "t_answered", "error", "keepalive")

    def __init__(self):
        self.state = "pending"  # pending | idle | closed | failed
        self.t_answered = None
        self.error = None
        self.keepalive = True


def err_name(e):
    if isinstance(e, asyncio.TimeoutError):
        return "timeout"
    if isinstance(e, asyncio.IncompleteReadError):
        return "eof"
    n = getattr(e, "errno", None)
    return errno.errorcode.get(n, type(e).__name__) if n else type(e).__name__


async def idle_client(port, c, sem, t0, deadline, stop):
    writer = None
    try:
        async with sem:
            left = deadline - time.monotonic()
            if left <= 0:
                raise asyncio.TimeoutError()
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), left)
            writer.write(REQUEST)
            status, c.keepalive = await asyncio.wait_for(read_response(reader), max(0.01, deadline - time.monotonic()))
            if status != 200:
                raise RuntimeError(f"status{status}")
        c.state, c.t_answered = "idle", time.monotonic() - t0
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            ValueError, IndexError, RuntimeError) as e:
        c.state, c.error = "failed", err_name(e)
        if writer:
            writer.close()
        return
    # idle: just notice if the server closes us
    try:
        eof = asyncio.ensure_future(reader.read(1))
        done, _ = await asyncio.wait([eof, asyncio.ensure_future(stop.wait())],
                                     return_when=asyncio.FIRST_COMPLETED)
        if eof in done:
            c.state = "closed"
        else:
            eof.cancel()
    except OSError:
        c.state = "closed"
    writer.close()


async def run_wrk(port, args):
    p = await asyncio.create_subprocess_exec(
        *benchlib.wrk_args(port, conns=args.conns, duration=args.duration),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(p.communicate(), args.duration + 20)
    except asyncio.TimeoutError:
        p.kill()
        await p.wait()
        return benchlib.parse_wrk("")
    return benchlib.parse_wrk(out.decode(errors="replace"))


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


async def measure(srv, args):
    r = {}
    if args.warmup > 0:
        p = await asyncio.create_subprocess_exec(
            *benchlib.wrk_args(srv.port, conns=args.conns, duration=args.warmup, latency=False),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await asyncio.wait_for(p.wait(), args.warmup + 20)
    r["base"] = await run_wrk(srv.port, args)
    await asyncio.sleep(0.5)
    r["rss_before"] = srv.rss_kb()
    # open the idle connections
    stop = asyncio.Event()
    sem = asyncio.Semaphore(args.connect_concurrency)
    conns = [Conn() for _ in range(args.n)]
    t0 = time.monotonic()
    deadline = t0 + args.deadline
    tasks = [asyncio.ensure_future(idle_client(srv.port, c, sem, t0, deadline, stop)) for c in conns]
    while time.monotonic() < deadline + 1 and any(c.state == "pending" for c in conns):
        await asyncio.sleep(0.05)
    answered = [c for c in conns if c.t_answered is not None]
    r["answered"] = len(answered)
    r["open_s"] = max((c.t_answered for c in answered), default=None)
    fails = {}
    for c in conns:
        if c.state == "failed":
            fails[c.error] = fails.get(c.error, 0) + 1
    r["fails"] = fails
    r["not_keepalive"] = sum(1 for c in answered if not c.keepalive)
    await asyncio.sleep(1)
    r["rss_idle"] = srv.rss_kb()
    r["fds"] = fd_count(srv.pid)
    r["open_before_wrk"] = sum(1 for c in conns if c.state == "idle")
    r["loaded"] = await run_wrk(srv.port, args)
    r["open_after_wrk"] = sum(1 for c in conns if c.state == "idle")
    r["rss_peak"] = srv.status_kb("VmHWM")
    stop.set()
    await asyncio.wait(tasks, timeout=10)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return r


def mb(kb):
    return None if kb is None else kb / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=10000, help="idle keep-alive connections (default 10000)")
    ap.add_argument("-d", "--duration", type=int, default=10, help="wrk seconds (default 10)")
    ap.add_argument("-c", "--conns", type=int, default=50, help="wrk connections (default 50)")
    ap.add_argument("--deadline", type=float, default=60, help="seconds to get all N answered (default 60)")
    ap.add_argument("--warmup", type=int, default=2, help="wrk warm-up seconds before the baseline (default 2)")
    ap.add_argument("--connect-concurrency", type=int, default=256, help="parallel connects (default 256)")
    ap.add_argument("rackup")
    ap.add_argument("servers", nargs="*", metavar="NAME='CMD'")
    args = ap.parse_args()
    rackup = os.path.abspath(args.rackup)
    if not os.path.exists(rackup):
        sys.exit(f"no such rackup: {rackup}")
    args.n = benchlib.cap_connections(args.n)
    try:
        lo, hi = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        if args.n + args.conns > hi - lo:
            print(f"note: n+wrk conns exceeds the ephemeral port range {lo}-{hi}; expect EADDRNOTAVAIL")
    except (OSError, ValueError):
        pass
    print(f"# idle keep-alive n={args.n} (deadline {args.deadline:.0f}s), then wrk -t1 -c{args.conns} "
          f"-d{args.duration}s with them open vs baseline without; rackup {rackup}")
    results = []
    def measure_server(srv):
        limit = srv.nofile_limit()
        if limit is not None and limit < args.n + 100:
            print(f"note: {srv.name} got RLIMIT_NOFILE {limit} < n+100; it cannot hold all {args.n}")
        return asyncio.run(measure(srv, args))

    for name, r, alive in benchlib.run_servers(args.servers, rackup, measure_server):
        b, l = r["base"], r["loaded"]
        per_conn = None
        if r["rss_idle"] is not None and r["rss_before"] is not None and r["answered"]:
            per_conn = (r["rss_idle"] - r["rss_before"]) / r["answered"]
        fails = ",".join(f"{k}={v}" for k, v in sorted(r["fails"].items())) or "none"
        results.append((name, r))
        print(f"{name} answered={r['answered']}/{args.n} in_s={benchlib.fmt(r['open_s'])} failed={fails} "
              f"rss_mb_before={benchlib.fmt(mb(r['rss_before']), '.1f')} "
              f"rss_mb_idle={benchlib.fmt(mb(r['rss_idle']), '.1f')} (kb_per_conn={benchlib.fmt(per_conn, '.1f')}) "
              f"peak_rss_mb={benchlib.fmt(mb(r['rss_peak']), '.1f')} server_fds={r['fds']} "
              f"idle_open_before/after_wrk={r['open_before_wrk']}/{r['open_after_wrk']} "
              f"rps_idle={l['rps']:.0f} p99_ms_idle={benchlib.fmt(l['p99'], '.3f')} errs_idle={l['errors']} "
              f"rps_base={b['rps']:.0f} p99_ms_base={benchlib.fmt(b['p99'], '.3f')} errs_base={b['errors']} "
              f"idle/base_rps={benchlib.ratio(l['rps'], b['rps'])}"
              + (f" not_keepalive={r['not_keepalive']}" if r["not_keepalive"] else "")
              + ("" if alive else " SERVER-DIED"))
        if any("EADDRNOTAVAIL" in k for k in r["fails"]):
            print(f"note: {name}: EADDRNOTAVAIL = ephemeral port range exhausted on 127.0.0.1")
    if results:
        ref_name, ref = results[0]
        for name, r in results[1:]:
            print(f"ratio {name}/{ref_name} rps_idle={benchlib.ratio(r['loaded']['rps'], ref['loaded']['rps'])} "
                  f"rps_base={benchlib.ratio(r['base']['rps'], ref['base']['rps'])} "
                  f"rss_idle={benchlib.ratio(r['rss_idle'], ref['rss_idle'])} "
                  f"p99_idle={benchlib.ratio(ref['loaded']['p99'], r['loaded']['p99'])}")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
