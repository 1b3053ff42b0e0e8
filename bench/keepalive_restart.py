#!/usr/bin/env python3
"""Keep-alive clients across restarts, with a per-request account (stdlib only).

Starts `bin/hyperion -w 2` on the hello app, runs C asyncio keep-alive
connections for S seconds (each sends its next request as soon as a response
ends, honours `connection: close` by reconnecting), sends each SIGNAL at 2 s,
4 s, ... (`--every`) and prints how many responses came back, by status, and every
request that got no response (with its time and exception).

Usage: bench/keepalive_restart.py [--connections 64] [--seconds 8] [--every 2] USR2 USR1 ...
"""
import argparse
import asyncio
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("SHARED", os.path.join(os.path.dirname(REPO), "shared"))
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


async def client(port, deadline, counts, failures):
    reader = writer = None
    while time.monotonic() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                counts["connections"] += 1
            writer.write(REQUEST)
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            fields = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
            await reader.readexactly(int(fields.get("content-length", "0")))
            counts[head[0][9:12]] += 1
            if "close" in fields.get("connection", ""):
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            failures.append((round(time.monotonic() - START, 3), type(e).__name__, str(e)[:60]))
            if writer is not None:
                writer.close()
            writer = None


async def load(port, seconds, connections, counts, failures):
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(client(port, deadline, counts, failures) for _ in range(connections)))


def main():
    global START
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--every", type=float, default=2, help="seconds between signals")
    parser.add_argument("signals", nargs="*", default=["USR2", "USR1"])
    args = parser.parse_args()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    server = subprocess.Popen(
        ["bin/hyperion", "-w", "2", "-t", "5", "-b", "127.0.0.1", "-p", "0",
         os.path.join(SHARED, "bench/apps/hello.ru")],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HYPERION_LOG": "warn"})
    try:
        for _ in range(200):
            text = open(log.name).read()
            if "all 2 workers serving" in text:
                break
            time.sleep(0.05)
        port = int(re.search(r"listening on http://[\d.]+:(\d+)", text).group(1))
        counts, failures = collections.Counter(), []
        START = time.monotonic()
        loop = asyncio.new_event_loop()
        for i, name in enumerate(args.signals):
            loop.call_later(args.every * (i + 1), server.send_signal, getattr(signal, "SIG" + name))
        loop.run_until_complete(load(port, args.seconds, args.connections, counts, failures))
        responses = sum(v for k, v in counts.items() if k != "connections")
        print(f"signals {' '.join(args.signals)}: {responses} responses {dict(counts)}, "
              f"{len(failures)} requests without a response")
        for failure in failures:
            print("  ", failure)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            print("the server did not stop within 60 s of TERM; killing it")
            server.kill()
            server.wait()
        print("".join(l for l in open(log.name) if re.search(r"master|hyperion:", l)), end="")


if __name__ == "__main__":
    sys.exit(main())
