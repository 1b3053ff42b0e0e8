#!/usr/bin/env python3
"""Slowloris resistance: normal clients' throughput/latency while N slow clients trickle headers.

Usage (from anywhere; server commands run from the repo root, like compare):

  bench/slowloris.py [-n 500] [-d 10] [-c 50] [--attack-max 30] RACKUP [NAME='CMD' ...]

  e.g. bench/slowloris.py ../shared/bench/apps/hello.ru \\
         puma='puma -t 5:5 -b tcp://127.0.0.1:{port} {rackup}' \\
         hyperion='bin/hyperion -t 5 -b 127.0.0.1 -p {port} {rackup}'
  (with no NAME='CMD' pairs, exactly those two servers are used)

For each server in turn (one at a time, on a free port, killed by pid afterwards):
start it, open N connections that each send "GET / HTTP/1.1\\r\\nHost: x\\r\\n" and
then one header byte per second (cycling "X-a: b\\r\\n", so the request never
ends), then run `wrk -t1 -cC -dDs --latency /` as normal clients. The attack
lasts until wrk ends, and never more than --attack-max seconds in total.
Prints one line per server (normal clients' req/s, p50, p99, wrk errors; slow
sockets still open at the end, closed/answered by the server, connect errors),
then ratios against the first server (p99 ratio is REF/NAME: > 1 = lower tail).
Traffic goes to 127.0.0.1 only. Raises its own RLIMIT_NOFILE to N+200.
"""
import argparse
import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

PREFIX = b"GET / HTTP/1.1\r\nHost: x\r\n"
TRICKLE = b"X-a: b\r\n"


class Slow:
    __slots__ = ("state", "t_open", "t_end", "answered", "error")

    def __init__(self):
        self.state = "connecting"  # connecting | open | closed | failed
        self.t_open = self.t_end = None
        self.answered = False      # server sent bytes (e.g. 408/400) before closing
        self.error = None


async def slow_client(port, st, sem, stop, deadline):
    writer = None
    try:
        async with sem:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
            writer.write(PREFIX)
            await writer.drain()
        st.state, st.t_open = "open", time.monotonic()
    except (OSError, asyncio.TimeoutError) as e:
        st.state, st.error = "failed", type(e).__name__ + (f"({e.errno})" if getattr(e, "errno", None) else "")
        if writer:
            writer.close()
        return

    async def watch():  # notices the server closing or answering the socket
        while True:
            data = await reader.read(4096)
            if not data:
                return
            st.answered = True

    watcher = asyncio.ensure_future(watch())
    i = 0
    try:
        while not stop.is_set() and time.monotonic() < deadline and not watcher.done():
            try:
                await asyncio.wait_for(asyncio.shield(watcher), 1.0)
            except asyncio.TimeoutError:
                pass
            if watcher.done() or stop.is_set():
                break
            writer.write(TRICKLE[i % len(TRICKLE):i % len(TRICKLE) + 1])
            i += 1
            await writer.drain()
    except OSError as e:
        st.error = type(e).__name__
    if watcher.done() or st.error:
        st.state, st.t_end = "closed", time.monotonic()
    if not watcher.done():
        watcher.cancel()
    try:
        await watcher
    except (asyncio.CancelledError, OSError):
        pass
    writer.close()


async def attack_and_measure(port, args):
    stop = asyncio.Event()
    sem = asyncio.Semaphore(args.connect_concurrency)
    t0 = time.monotonic()
    deadline = t0 + args.attack_max
    states = [Slow() for _ in range(args.n)]
    tasks = [asyncio.ensure_future(slow_client(port, st, sem, stop, deadline)) for st in states]
    # let the connections establish (bounded), then start the normal clients
    ramp_end = t0 + min(10, args.attack_max / 3)
    while time.monotonic() < ramp_end and any(s.state == "connecting" for s in states):
        await asyncio.sleep(0.1)
    await asyncio.sleep(1)
    wrk = await asyncio.create_subprocess_exec(
        *benchlib.wrk_args(port, conns=args.conns, duration=args.duration),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    remaining = max(1, deadline - time.monotonic())
    try:
        out, _ = await asyncio.wait_for(wrk.communicate(), max(remaining, args.duration + 15))
        out = out.decode(errors="replace")
    except asyncio.TimeoutError:
        wrk.kill()
        await wrk.wait()
        out = ""
    # snapshot at the end of the normal-client run, before we tear down
    still_open = sum(1 for s in states if s.state == "open")
    stop.set()
    await asyncio.wait(tasks, timeout=5)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return benchlib.parse_wrk(out), states, still_open, out


def summarize(states, still_open):
    failed = [s for s in states if s.state == "failed"]
    closed = [s for s in states if s.t_end is not None and s.t_open is not None]
    errs = {}
    for s in failed:
        errs[s.error] = errs.get(s.error, 0) + 1
    life = statistics.median([s.t_end - s.t_open for s in closed]) if closed else None
    return {
        "open": still_open,
        "closed": len(closed),
        "answered": sum(1 for s in states if s.answered),
        "failed": len(failed),
        "fail_detail": ",".join(f"{k}={v}" for k, v in sorted(errs.items())) or "none",
        "median_life": life,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=500, help="slowloris connections (default 500)")
    ap.add_argument("-d", "--duration", type=int, default=10, help="wrk seconds (default 10)")
    ap.add_argument("-c", "--conns", type=int, default=50, help="wrk connections (default 50)")
    ap.add_argument("--attack-max", type=float, default=None,
                    help="hard cap on the attack's total seconds (default duration+20)")
    ap.add_argument("--connect-concurrency", type=int, default=100, help="parallel connects (default 100)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print wrk's raw output")
    ap.add_argument("rackup")
    ap.add_argument("servers", nargs="*", metavar="NAME='CMD'")
    args = ap.parse_args()
    if args.attack_max is None:
        args.attack_max = args.duration + 20
    rackup = os.path.abspath(args.rackup)
    if not os.path.exists(rackup):
        sys.exit(f"no such rackup: {rackup}")
    args.n = benchlib.cap_connections(args.n)
    print(f"# slowloris n={args.n} (1 header byte/s), wrk -t1 -c{args.conns} -d{args.duration}s, "
          f"attack cap {args.attack_max:.0f}s, rackup {rackup}")
    results = []
    measure = lambda srv: asyncio.run(attack_and_measure(srv.port, args))  # noqa: E731
    for name, (w, states, still_open, raw), alive in benchlib.run_servers(args.servers, rackup, measure):
        s = summarize(states, still_open)
        if args.verbose:
            print(raw)
        results.append((name, w))
        print(f"{name} rps={w['rps']:.0f} p50_ms={benchlib.fmt(w['p50'], '.3f')} "
              f"p99_ms={benchlib.fmt(w['p99'], '.3f')} wrk_errors={w['errors']}({w['err_detail']}) "
              f"slow_open_at_end={s['open']}/{args.n} slow_closed_by_server={s['closed']} "
              f"(answered={s['answered']} median_s_to_close={benchlib.fmt(s['median_life'], '.1f')}) "
              f"slow_connect_errors={s['failed']}({s['fail_detail']})"
              + ("" if alive else " SERVER-DIED"))
    if results:
        ref_name, ref = results[0]
        for name, w in results[1:]:
            p99 = benchlib.ratio(ref["p99"], w["p99"])
            print(f"ratio {name}/{ref_name} rps={benchlib.ratio(w['rps'], ref['rps'])} p99={p99}")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
