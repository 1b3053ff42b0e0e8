# frozen_string_literal: true

require "spec_helper"

RSpec.describe "HTTP/1.1 handling" do
  let(:echo) do
    ->(env) { [200, { "content-type" => "text/plain" }, ["#{env['REQUEST_METHOD']} #{env['PATH_INFO']} #{env['rack.input'].read}"]] }
  end

  it "keeps a connection alive across requests" do
    with_worker(echo) do |port|
      Net::HTTP.start("127.0.0.1", port) do |http|
        bodies = %w[/a /b /c].map { |path| http.get(path).body }
        expect(bodies).to eq(["GET /a ", "GET /b ", "GET /c "])
      end
      socket = TCPSocket.new("127.0.0.1", port)
      2.times do |i|
        socket.write("GET /#{i} HTTP/1.1\r\nHost: x\r\n\r\n")
        head = socket.readpartial(4096)
        expect(head).to start_with("HTTP/1.1 200").and end_with("GET /#{i} ")
      end
      socket.close
    end
  end

  it "closes a keep-alive connection after max_keepalive_requests, saying so on the last response" do
    with_worker(echo, max_keepalive_requests: 2) do |port|
      raw = (1..3).map { |i| "GET /k#{i} HTTP/1.1\r\nHost: x\r\n\r\n" }.join
      responses = parse_responses(raw_exchange(port, raw))
      expect(responses.map(&:last)).to eq(["GET /k1 ", "GET /k2 "])
      expect(responses.map { |(_, headers, _)| headers["connection"] }).to eq([nil, ["close"]])
    end
    with_worker(echo, max_keepalive_requests: 0) do |port|
      raw = (1..3).map { |i| "GET /u#{i} HTTP/1.1\r\nHost: x\r\n\r\n" }.join
      expect(parse_responses(raw_exchange(port, raw, wait: 1)).size).to eq(3)
    end
  end

  it "answers pipelined requests in order" do
    with_worker(echo, thread_count: 4) do |port|
      raw = (1..5).map { |i| "GET /p#{i} HTTP/1.1\r\nHost: x\r\n\r\n" }.join +
            "POST /last HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\ndata"
      bodies = parse_responses(raw_exchange(port, raw)).map(&:last)
      expect(bodies).to eq(["GET /p1 ", "GET /p2 ", "GET /p3 ", "GET /p4 ", "GET /p5 ", "POST /last data"])
    end
  end

  it "reads chunked request bodies, including chunk extensions and trailers" do
    with_worker(echo) do |port|
      raw = "POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" \
            "3;ext=1\r\nabc\r\n4\r\ndefg\r\n0\r\nX-Trailer: t\r\n\r\n" \
            "GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
      bodies = parse_responses(raw_exchange(port, raw)).map(&:last)
      expect(bodies).to eq(["POST /up abcdefg", "GET /after "])
    end
  end

  it "serves HTTP/1.0 without keep-alive (closes) and with keep-alive (keeps open)" do
    with_worker(echo) do |port|
      raw = raw_exchange(port, "GET /old HTTP/1.0\r\n\r\n", wait: 3)
      expect(raw).to start_with("HTTP/1.0 200").and end_with("GET /old ")

      socket = TCPSocket.new("127.0.0.1", port)
      socket.write("GET /ka1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
      first = socket.readpartial(4096)
      expect(first).to start_with("HTTP/1.0 200")
      expect(first.downcase).to include("connection: keep-alive")
      socket.write("GET /ka2 HTTP/1.0\r\n\r\n")
      expect(read_all(socket, 3)).to end_with("GET /ka2 ")
      socket.close
    end
  end

  it "returns 500 for an app exception and keeps serving, on the same connection too" do
    app = ->(env) { env["PATH_INFO"] == "/boom" ? raise(ArgumentError, "kaboom") : [200, {}, ["fine"]] }
    with_worker(app) do |port|
      raw = raw_exchange(port, "GET /boom HTTP/1.1\r\nHost: x\r\n\r\nGET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      responses = parse_responses(raw)
      expect(responses.map { |r| [r[0], r[2]] }).to eq([[500, "Internal Server Error\n"], [200, "fine"]])
      expect(http_get(port, "/ok").body).to eq("fine")
    end
  end

  it "answers a request that exceeds max_request_read_seconds with 408" do
    with_worker(echo, max_request_read_seconds: 0.5) do |port|
      socket = TCPSocket.new("127.0.0.1", port)
      socket.write("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
      expect(read_all(socket, 5)).to start_with("HTTP/1.1 408")
      socket.close
      expect(http_get(port, "/still").body).to eq("GET /still ")
    end
  end

  it "answers 503 with retry-after when max_pending requests already wait" do
    release = Queue.new
    slow = ->(_env) { release.pop; [200, {}, ["slow"]] }
    with_worker(slow, thread_count: 1, max_pending: 1) do |port|
      busy = Thread.new { http_get(port) }           # occupies the only thread
      sleep 0.2
      queued = Thread.new { http_get(port) }         # waits in the queue
      sleep 0.2
      refused = http_get(port)
      expect(refused.code).to eq("503")
      expect(refused["retry-after"]).to eq("1")
      2.times { release << true }
      expect([busy.value.body, queued.value.body]).to eq(%w[slow slow])
    end
  end
end
