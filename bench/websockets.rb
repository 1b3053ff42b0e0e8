#!/usr/bin/env ruby
# frozen_string_literal: true

# WebSockets and Server-Sent Events (issue 10).
#
#   bench/websockets.rb [CONNECTIONS [TLS_CONNECTIONS]]   (default 1000 and 400; run from anywhere)
#
# 1. CONNECTIONS WebSockets on one worker (`bin/hyperion -t 2` serving
#    spec/fixtures/faye_echo.ru, faye-websocket on EventMachine with epoll),
#    over ws:// (the client's socket handed to the app) and wss:// (TLS
#    bridged through a socketpair): the client (spec/support/ws_client.py)
#    opens them all at once, each echoes a text and a binary message; with
#    all open it GETs /hello; then every connection echoes once more and
#    closes. Prints the time until all had echoed, the hello's time, and the
#    worker's RSS before (idle) and at its peak (VmHWM).
# 2. SSE time to first event: an in-process worker whose app writes one event
#    and then blocks until the client has it; the time from just before the
#    app's write (#each yield or stream.write + flush) to the client reading
#    it, over 200 requests per style. Median, p90 and max, in milliseconds.
#
# Needs python3 with `websockets`. The numbers come from whatever machine
# runs this; say so when quoting them.

require "json"
require "open3"
require "rbconfig"
require "socket"
require "timeout"

ROOT = File.expand_path("..", __dir__)
$LOAD_PATH.unshift(File.join(ROOT, "lib"))
require "hyperion"

CONNECTIONS = Integer(ARGV.fetch(0, "1000"))
# The Python client does TLS handshakes on one thread: ~1,000 at once take it
# past the server's handshake timeout (the server sits idle meanwhile; a C
# client, h2load, opens 1,000 TLS connections in 1 s), so wss:// opens fewer.
TLS_CONNECTIONS = Integer(ARGV.fetch(1, "400"))

def free_port
  server = TCPServer.new("127.0.0.1", 0)
  server.local_address.ip_port
ensure
  server&.close
end

def rss_kb(pid, field)
  File.read("/proc/#{pid}/status")[/#{field}:\s+(\d+)/, 1].to_i
end

def websockets(scheme, connections)
  port = free_port
  args = ["-t", "2", "-b", "127.0.0.1", "-p", port.to_s]
  args << "--tls-self-signed" if scheme == "wss"
  log = File.open(File::NULL, "w")
  pid = Process.spawn({ "HYPERION_SPEC_EM_EPOLL" => "1", "HYPERION_LOG" => "warn" }, RbConfig.ruby,
                      File.join(ROOT, "bin/hyperion"), *args, File.join(ROOT, "spec/fixtures/faye_echo.ru"),
                      out: log, err: log)
  Timeout.timeout(60) do
    begin
      TCPSocket.new("127.0.0.1", port).close
    rescue Errno::ECONNREFUSED
      sleep 0.1
      retry
    end
  end
  idle = rss_kb(pid, "VmRSS")
  out, err, status = Open3.capture3("python3", File.join(ROOT, "spec/support/ws_client.py"), "many",
                                    "#{scheme}://127.0.0.1:#{port}/", connections.to_s,
                                    "#{scheme == "wss" ? "https" : "http"}://127.0.0.1:#{port}/hello")
  raise "ws_client failed: #{err}" unless status.success?

  result = JSON.parse(out)
  peak = rss_kb(pid, "VmHWM")
  format("%-4s %d connections, %d echoed: all echoed in %.2f s; hello (all open) %.1f ms; " \
         "worker RSS idle %.1f MB, peak %.1f MB (%.1f KB per connection)",
         scheme, result["connected"], result["echoed"], result["seconds_to_echo_all"], result["hello_seconds"] * 1000,
         idle / 1024.0, peak / 1024.0, (peak - idle).fdiv(connections))
ensure
  if pid
    Process.kill("TERM", pid)
    Process.wait(pid)
  end
end

def sse_first_event(style, requests: 200)
  sent = Queue.new
  received = Queue.new
  app = lambda do |_env|
    headers = { "content-type" => "text/event-stream" }
    case style
    when :each
      [200, headers, Enumerator.new do |out|
        sent << Process.clock_gettime(Process::CLOCK_MONOTONIC)
        out << "data: first\n\n"
        received.pop
      end]
    when :call
      [200, headers, lambda do |stream|
        sent << Process.clock_gettime(Process::CLOCK_MONOTONIC)
        stream.write("data: first\n\n")
        stream.flush
        received.pop
      end]
    end
  end
  listener = TCPServer.new("127.0.0.1", 0)
  worker = Hyperion::Worker.new(host: "127.0.0.1", port: 0, app: app, read_timeout: 30, thread_count: 2,
                                listener: listener)
  runner = Thread.new { worker.run }
  port = listener.local_address.ip_port
  samples = Array.new(requests) do
    socket = TCPSocket.new("127.0.0.1", port)
    socket.write("GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    seen = +""
    seen << socket.readpartial(4096) until seen.include?("data: first\n\n")
    arrived = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    received << :got_it
    socket.close
    (arrived - sent.pop) * 1000
  end.sort
  format("SSE #%-4s first event after the app's write: median %.2f ms, p90 %.2f ms, max %.2f ms (%d requests)",
         style, samples[samples.size / 2], samples[(samples.size * 0.9).floor], samples.last, requests)
ensure
  worker&.stop
  runner&.join
  listener&.close
end

puts websockets("ws", CONNECTIONS)
puts websockets("wss", TLS_CONNECTIONS)
puts sse_first_event(:each)
puts sse_first_event(:call)
