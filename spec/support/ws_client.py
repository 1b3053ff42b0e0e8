"""WebSocket client for the specs (Python `websockets`, an implementation
independent of the Ruby libraries the server-side apps use).

Prints one JSON object on stdout. Modes:

  echo URI N
      sends N text and N binary messages one after the other, checks each
      echo, closes with 1000; {"text": n, "binary": n, "close_code": c}
  many URI COUNT HELLO_URL
      opens COUNT connections at once; each sends a text and a binary message
      and checks the echoes; with all of them open, GETs HELLO_URL (the app
      threads must be free for HTTP); then echoes once more on every
      connection and closes them all. {"connected", "echoed", "hello_status",
      "hello_body", "seconds_to_echo_all", "hello_seconds"}
  cable URI BROADCAST_URL
      ActionCable: subscribes to ChatChannel, waits for the confirmation,
      POSTs to BROADCAST_URL and waits for the broadcast. {"confirmed",
      "message"}
"""

import asyncio
import json
import os
import resource
import ssl
import sys
import time
import urllib.request

import websockets

TIMEOUT = float(os.environ.get("WS_CLIENT_TIMEOUT", "120"))


def ssl_context(uri):
    if not uri.startswith("wss:"):
        return None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def connect(uri, **options):
    return websockets.connect(
        uri, ssl=ssl_context(uri), open_timeout=TIMEOUT, close_timeout=TIMEOUT,
        max_size=None, **options)


async def echo(uri, count):
    texts = binaries = 0
    async with connect(uri) as ws:
        for i in range(count):
            text = f"message {i} " + "é" * (i % 7) + "x" * (i * 13 % 300)
            await ws.send(text)
            answer = await ws.recv()
            assert answer == text, (answer, text)
            texts += 1
            data = bytes((i + j) % 256 for j in range(i * 37 % 5000 + 1))
            await ws.send(data)
            answer = await ws.recv()
            assert answer == data, (len(answer), len(data))
            binaries += 1
        await ws.close(1000)
        return {"text": texts, "binary": binaries, "close_code": ws.close_code}


async def one_connection(uri, index, opened, everyone_open, done):
    async with connect(uri) as ws:
        await ws.send(f"hello {index}")
        assert await ws.recv() == f"hello {index}"
        data = index.to_bytes(4, "big") * 8
        await ws.send(data)
        assert await ws.recv() == data
        opened.append(index)
        await everyone_open.wait()
        await ws.send(f"again {index}")
        assert await ws.recv() == f"again {index}"
        await done.wait()
        await ws.close(1000)
        return ws.close_code


def http_get(url):
    started = time.monotonic()
    context = ssl_context("wss:") if url.startswith("https:") else None
    with urllib.request.urlopen(url, timeout=TIMEOUT, context=context) as response:
        return response.status, response.read().decode(), time.monotonic() - started


async def many(uri, count, hello_url):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    opened = []
    everyone_open = asyncio.Event()
    done = asyncio.Event()
    started = time.monotonic()
    tasks = [asyncio.create_task(one_connection(uri, i, opened, everyone_open, done))
             for i in range(count)]
    while len(opened) < count:
        failed = [t for t in tasks if t.done() and t.exception()]
        if failed:
            raise failed[0].exception()
        await asyncio.sleep(0.01)
    seconds = time.monotonic() - started
    # Every connection is open and has echoed; the app threads must still
    # answer plain HTTP.
    status, body, hello_seconds = await asyncio.to_thread(http_get, hello_url)
    everyone_open.set()
    done.set()
    codes = await asyncio.gather(*tasks)
    return {"connected": len(opened), "echoed": sum(1 for c in codes if c == 1000),
            "hello_status": status, "hello_body": body,
            "seconds_to_echo_all": round(seconds, 3), "hello_seconds": round(hello_seconds, 4)}


async def cable(uri, broadcast_url):
    async with connect(uri, subprotocols=["actioncable-v1-json"],
                       origin="http://localhost") as ws:
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome", welcome
        identifier = json.dumps({"channel": "ChatChannel"})
        await ws.send(json.dumps({"command": "subscribe", "identifier": identifier}))
        confirmed = False
        message = None
        while True:
            frame = json.loads(await ws.recv())
            if frame.get("type") == "ping":
                continue
            if frame.get("type") == "confirm_subscription":
                confirmed = True
                request = urllib.request.Request(broadcast_url, data=b"", method="POST")
                await asyncio.to_thread(urllib.request.urlopen, request, None, TIMEOUT)
                continue
            if "message" in frame:
                message = frame["message"]
                break
        return {"confirmed": confirmed, "message": message}


def main():
    mode, uri, *rest = sys.argv[1:]
    if mode == "echo":
        result = echo(uri, int(rest[0]))
    elif mode == "many":
        result = many(uri, int(rest[0]), rest[1])
    elif mode == "cable":
        result = cable(uri, rest[0])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(asyncio.run(asyncio.wait_for(result, TIMEOUT))))


if __name__ == "__main__":
    main()
