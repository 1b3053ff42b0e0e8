#!/usr/bin/env python3
"""An HTTP/2 client that misbehaves on purpose, for the specs. It speaks raw
frames (python h2's hyperframe and hpack: `pip install h2`) over h2c with
prior knowledge to 127.0.0.1:PORT, so it can do what a well-behaved client
library refuses to (and keeps reading after a GOAWAY). Runs one scenario and
prints what it saw as one JSON object.

Deadlines here only end a hang: every scenario stops as soon as it has seen
what it waits for, so they are long (the machine may be loaded). A write the
server no longer accepts (it closed after its GOAWAY) does not stop the
reading: what the server sent before closing is still in our receive buffer.

  h2_probe.py stall PORT STREAMS SECONDS    window 0, STREAMS GETs, no WINDOW_UPDATE;
                                            `seconds`: until every stream ended
  h2_probe.py stall_mute PORT STREAMS SECONDS   the same, and no PING is ever answered
  h2_probe.py ping_flood PORT SECONDS       PINGs as fast as acks come back
  h2_probe.py settings_flood PORT SECONDS   empty SETTINGS frames, likewise
  h2_probe.py polite PORT                   a few PINGs and SETTINGS, then GET /
  h2_probe.py reset_flood PORT COUNT        COUNT HEADERS+RST_STREAM pairs at once
  h2_probe.py reset_then_idle PORT PATH SECONDS
                                            GET PATH, cancel it, wait for the close
  h2_probe.py early_answer PORT PATH BYTES  a gRPC-style upload of BYTES that never ends
                                            (no END_STREAM): the answer the server gives
                                            while the client is still sending
  h2_probe.py slow_then_fast PORT           GET /slow and GET /fast on one connection;
                                            once /fast has ended, GET /release
"""
import json
import socket
import sys
import time

import hpack
from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame,
                              RstStreamFrame, SettingsFrame)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CANCEL = 8


class Probe:
    def __init__(self, port, settings=None, answer_pings=True):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = port
        self.answer_pings = answer_pings
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.inbox = b""
        self.header_block = None  # (stream_id, bytes, end_stream) until END_HEADERS
        self.next_stream = 1
        self.closed = False  # the server's side ended (EOF or reset on read)
        self.write_failed = False
        self.goaways = []
        self.resets = {}
        self.responses = {}
        self.ended = set()
        self.data_bytes = 0
        self.bodies = {}
        self.end_order = []
        self.ping_acks = 0
        self.settings_acks = 0
        self.outbox = [PREFACE, SettingsFrame(0, settings=settings or {}).serialize()]
        self.flush()

    def send(self, frame):
        self.outbox.append(frame.serialize())

    def flush(self):
        if self.outbox and not self.closed and not self.write_failed:
            try:
                self.sock.sendall(b"".join(self.outbox))
            except OSError:
                self.write_failed = True
        self.outbox = []

    def get(self, path="/"):
        return self.request("GET", path)

    def request(self, method, path, headers=(), end_stream=True):
        stream_id = self.next_stream
        self.next_stream += 2
        block = self.encoder.encode([(":method", method), (":scheme", "http"),
                                     (":authority", f"127.0.0.1:{self.port}"), (":path", path), *headers])
        flags = ["END_HEADERS", "END_STREAM"] if end_stream else ["END_HEADERS"]
        self.send(HeadersFrame(stream_id, data=block, flags=flags))
        return stream_id

    def pump(self, timeout):
        """Reads what arrives within `timeout` seconds (one read) and handles
        every complete frame."""
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
        self.inbox += data
        while len(self.inbox) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.inbox[:9]))
            if len(self.inbox) < 9 + length:
                break
            frame.parse_body(memoryview(self.inbox[9:9 + length]))
            self.inbox = self.inbox[9 + length:]
            self.handle(frame)
        self.flush()

    def handle(self, frame):
        if isinstance(frame, (HeadersFrame, ContinuationFrame)):
            if isinstance(frame, HeadersFrame):
                self.header_block = (frame.stream_id, b"", "END_STREAM" in frame.flags)
            stream_id, block, end_stream = self.header_block
            block += frame.data
            self.header_block = (stream_id, block, end_stream)
            if "END_HEADERS" in frame.flags:
                fields = dict(self.decoder.decode(block))
                if stream_id not in self.responses and ":status" in fields:
                    self.responses[stream_id] = fields[":status"]
                if end_stream:
                    self.ended.add(stream_id)
                    self.end_order.append(stream_id)
        elif isinstance(frame, DataFrame):
            self.data_bytes += len(frame.data)
            self.bodies[frame.stream_id] = self.bodies.get(frame.stream_id, b"") + frame.data
            if "END_STREAM" in frame.flags:
                self.ended.add(frame.stream_id)
                self.end_order.append(frame.stream_id)
        elif isinstance(frame, RstStreamFrame):
            self.resets[frame.stream_id] = frame.error_code
        elif isinstance(frame, GoAwayFrame):
            self.goaways.append(frame.error_code)
        elif isinstance(frame, PingFrame):
            if "ACK" in frame.flags:
                self.ping_acks += 1
            elif self.answer_pings:
                self.send(PingFrame(0, opaque_data=frame.opaque_data, flags=["ACK"]))
        elif isinstance(frame, SettingsFrame):
            if "ACK" in frame.flags:
                self.settings_acks += 1
            else:
                self.send(SettingsFrame(0, flags=["ACK"]))

    def report(self, **extra):
        codes = {}
        for code in self.resets.values():
            codes[str(code)] = codes.get(str(code), 0) + 1
        print(json.dumps({"goaway": self.goaways[-1] if self.goaways else None, "goaways": self.goaways,
                          "closed": self.closed, "resets": codes, "responses": len(self.responses),
                          "ended": len(self.ended), "data_bytes": self.data_bytes, "ping_acks": self.ping_acks,
                          "settings_acks": self.settings_acks, **extra}))


def stall(port, streams, seconds, answer_pings=True):
    probe = Probe(port, {SettingsFrame.INITIAL_WINDOW_SIZE: 0}, answer_pings=answer_pings)
    ids = [probe.get("/") for _ in range(streams)]
    probe.flush()
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    while time.monotonic() < deadline and not probe.closed:
        if all(i in probe.resets or i in probe.ended for i in ids):
            break
        probe.pump(0.2)
    finished_after = round(time.monotonic() - started, 2)
    # Then watch the connection until the server closes it (or the deadline).
    while time.monotonic() < deadline and not probe.closed:
        probe.pump(0.2)
    closed_after = round(time.monotonic() - started, 2) if probe.closed else None
    probe.report(seconds=finished_after, closed_after=closed_after)


FLOOD_BATCH = 2_000  # twice the server's burst, in one write


def flood(port, seconds, frame_for):
    """Sends control frames in batches larger than the server's whole budget,
    so that it is a flood however slowly this client runs."""
    probe = Probe(port)
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not probe.closed and not probe.write_failed and not probe.goaways:
        for _ in range(FLOOD_BATCH):
            probe.send(frame_for(sent))
            sent += 1
        probe.flush()
        probe.pump(0.05)
    # Read what is still on its way (the GOAWAY, the close).
    drain_until = time.monotonic() + seconds
    while not probe.closed and time.monotonic() < drain_until:
        probe.pump(0.2)
    probe.report(sent=sent)


def polite(port):
    probe = Probe(port)
    for i in range(5):
        probe.send(PingFrame(0, opaque_data=i.to_bytes(8, "big")))
    for _ in range(3):
        probe.send(SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: 100}))
    stream_id = probe.get("/")
    probe.flush()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not probe.closed and stream_id not in probe.ended:
        probe.pump(0.2)
    probe.report(status=probe.responses.get(stream_id))


def reset_flood(port, count):
    probe = Probe(port)
    for _ in range(count):
        stream_id = probe.get("/")
        probe.send(RstStreamFrame(stream_id, error_code=CANCEL))
    probe.flush()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not probe.closed and not probe.goaways:
        probe.pump(0.2)
    probe.report()


def reset_then_idle(port, path, seconds):
    probe = Probe(port)
    stream_id = probe.get(path)
    probe.flush()
    probe.pump(0.3)
    probe.send(RstStreamFrame(stream_id, error_code=CANCEL))
    probe.flush()
    started = time.monotonic()
    while time.monotonic() - started < seconds and not probe.closed:
        probe.pump(0.2)
    probe.report(closed_after=round(time.monotonic() - started, 2))


def early_answer(port, path, size):
    probe = Probe(port)
    stream_id = probe.request("PUT", path, [("content-type", "application/grpc")], end_stream=False)
    probe.send(DataFrame(stream_id, data=b"x" * size))
    probe.flush()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not probe.closed and stream_id not in probe.resets:
        probe.pump(0.2)
    probe.report(status=probe.responses.get(stream_id), body=probe.bodies.get(stream_id, b"").decode(),
                 response_ended=stream_id in probe.ended, reset=probe.resets.get(stream_id))


def slow_then_fast(port):
    probe = Probe(port)
    paths = {probe.get("/slow"): "/slow", probe.get("/fast"): "/fast"}
    probe.flush()
    deadline = time.monotonic() + 60
    released = False
    while time.monotonic() < deadline and not probe.closed and len(probe.ended) < 3:
        if not released and "/fast" in (paths[i] for i in probe.ended):
            paths[probe.get("/release")] = "/release"
            probe.flush()
            released = True
        probe.pump(0.2)
    probe.report(end_order=[paths[i] for i in probe.end_order],
                 bodies={paths[i]: body.decode() for i, body in probe.bodies.items()})


def main(argv):
    scenario, port = argv[1], int(argv[2])
    if scenario == "stall":
        stall(port, int(argv[3]), float(argv[4]))
    elif scenario == "stall_mute":
        stall(port, int(argv[3]), float(argv[4]), answer_pings=False)
    elif scenario == "ping_flood":
        flood(port, float(argv[3]), lambda n: PingFrame(0, opaque_data=n.to_bytes(8, "big")))
    elif scenario == "settings_flood":
        flood(port, float(argv[3]), lambda n: SettingsFrame(0))
    elif scenario == "polite":
        polite(port)
    elif scenario == "reset_flood":
        reset_flood(port, int(argv[3]))
    elif scenario == "reset_then_idle":
        reset_then_idle(port, argv[3], float(argv[4]))
    elif scenario == "early_answer":
        early_answer(port, argv[3], int(argv[4]))
    elif scenario == "slow_then_fast":
        slow_then_fast(port)
    else:
        sys.exit(f"unknown scenario {scenario}")


if __name__ == "__main__":
    main(sys.argv)
