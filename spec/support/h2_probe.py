#!/usr/bin/env python3
"""An HTTP/2 client that misbehaves on purpose, for the specs (python h2:
`pip install h2`). Speaks h2c with prior knowledge to 127.0.0.1:PORT, runs one
scenario and prints what it saw as one JSON object.

  h2_probe.py stall PORT STREAMS SECONDS    window 0, STREAMS GETs, no WINDOW_UPDATE
  h2_probe.py ping_flood PORT SECONDS       PINGs as fast as acks come back
  h2_probe.py settings_flood PORT SECONDS   empty SETTINGS frames, likewise
  h2_probe.py polite PORT                   a few PINGs and SETTINGS, then GET /
  h2_probe.py reset_flood PORT COUNT        COUNT HEADERS+RST_STREAM pairs at once
  h2_probe.py reset_then_idle PORT PATH SECONDS
                                            GET PATH, cancel it, wait for the close
"""
import json
import socket
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings


class Probe:
    def __init__(self, port, settings=None):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)
        self.port = port
        self.closed = False
        self.goaway = None
        self.resets = {}
        self.responses = {}
        self.ended = set()
        self.ping_acks = 0
        self.settings_acks = 0
        self.flush()

    def flush(self):
        data = self.conn.data_to_send()
        if data and not self.closed:
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True

    def get(self, path="/"):
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [(":method", "GET"), (":scheme", "http"),
                                           (":authority", f"127.0.0.1:{self.port}"), (":path", path)],
                               end_stream=True)
        return stream_id

    def pump(self, timeout):
        """Reads and handles what arrives within `timeout` seconds (one read)."""
        if self.closed:
            return
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            events = []
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                self.responses[event.stream_id] = dict(event.headers).get(":status")
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.resets[event.stream_id] = int(event.error_code)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = int(event.error_code)
            elif isinstance(event, h2.events.PingAckReceived):
                self.ping_acks += 1
            elif isinstance(event, h2.events.SettingsAcknowledged):
                self.settings_acks += 1
        self.flush()

    def report(self, **extra):
        codes = {}
        for code in self.resets.values():
            codes[str(code)] = codes.get(str(code), 0) + 1
        print(json.dumps({"goaway": self.goaway, "closed": self.closed, "resets": codes,
                          "responses": len(self.responses), "ended": len(self.ended),
                          "ping_acks": self.ping_acks, "settings_acks": self.settings_acks, **extra}))


def stall(port, streams, seconds):
    probe = Probe(port, {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    ids = [probe.get("/") for _ in range(streams)]
    probe.flush()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not probe.closed:
        if all(i in probe.resets or i in probe.ended for i in ids):
            break
        probe.pump(0.2)
    probe.report(seconds=round(seconds - (deadline - time.monotonic()), 2))


def flood(port, seconds, send_one):
    probe = Probe(port)
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not probe.closed:
        for _ in range(100):
            send_one(probe.conn, sent)
            sent += 1
        probe.flush()
        probe.pump(0.05)
    # Read what is still on its way (the GOAWAY, the close).
    drain_until = time.monotonic() + 5
    while not probe.closed and time.monotonic() < drain_until:
        probe.pump(0.2)
    probe.report(sent=sent)


def polite(port):
    probe = Probe(port)
    for i in range(5):
        probe.conn.ping(i.to_bytes(8, "big"))
    for _ in range(3):
        probe.conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100})
    stream_id = probe.get("/")
    probe.flush()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not probe.closed and stream_id not in probe.ended:
        probe.pump(0.2)
    probe.report(status=probe.responses.get(stream_id))


def reset_flood(port, count):
    probe = Probe(port)
    for _ in range(count):
        stream_id = probe.get("/")
        probe.conn.reset_stream(stream_id, error_code=8)
    probe.flush()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not probe.closed and probe.goaway is None:
        probe.pump(0.2)
    probe.report()


def reset_then_idle(port, path, seconds):
    probe = Probe(port)
    stream_id = probe.get(path)
    probe.flush()
    probe.pump(0.3)
    probe.conn.reset_stream(stream_id, error_code=8)
    probe.flush()
    started = time.monotonic()
    while time.monotonic() - started < seconds and not probe.closed:
        probe.pump(0.2)
    probe.report(closed_after=round(time.monotonic() - started, 2))


def main(argv):
    scenario, port = argv[1], int(argv[2])
    if scenario == "stall":
        stall(port, int(argv[3]), float(argv[4]))
    elif scenario == "ping_flood":
        flood(port, float(argv[3]), lambda conn, n: conn.ping(n.to_bytes(8, "big")))
    elif scenario == "settings_flood":
        flood(port, float(argv[3]), lambda conn, n: conn.update_settings({}))
    elif scenario == "polite":
        polite(port)
    elif scenario == "reset_flood":
        reset_flood(port, int(argv[3]))
    elif scenario == "reset_then_idle":
        reset_then_idle(port, argv[3], float(argv[4]))
    else:
        sys.exit(f"unknown scenario {scenario}")


if __name__ == "__main__":
    main(sys.argv)
