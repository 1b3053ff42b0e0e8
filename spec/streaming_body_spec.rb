# frozen_string_literal: true

require "spec_helper"

# Rack 3 streaming bodies (a body that responds to #call and not #each gets a
# stream) and Server-Sent Events both ways (#each and #call), over HTTP/1.1
# and HTTP/2.
RSpec.describe "streaming bodies" do
  def run_client(*command)
    out, status = Open3.capture2e(*command)
    expect(status).to be_success, "#{command.join(' ')}\n#{out}"
    out
  end

  let(:stream_app) do
    lambda do |_env|
      body = lambda do |stream|
        stream.write("one,")
        stream << "two," << "three,"
        stream.flush
        stream.write(4)
        stream.close
      end
      [200, { "content-type" => "text/plain" }, body]
    end
  end

  it "streams what the body writes, chunked over HTTP/1.1 and as DATA over HTTP/2 (curl, nghttp)" do
    with_worker(stream_app) do |port|
      raw = raw_exchange(port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      status, headers, body = parse_responses(raw).first
      expect([status, headers["transfer-encoding"], body]).to eq([200, ["chunked"], "one,two,three,4"])
      expect(run_client("curl", "-s", "--http2-prior-knowledge", "http://127.0.0.1:#{port}/"))
        .to eq("one,two,three,4")
      out = run_client("nghttp", "http://127.0.0.1:#{port}/")
      expect(out).to eq("one,two,three,4")
    end
  end

  it "gives the stream IO semantics: write returns the size, closed streams raise IOError, read reads the body" do
    seen = Queue.new
    app = lambda do |env|
      body = lambda do |stream|
        facts = { written: stream.write("héllo"), shovel: stream << "!", flushed: stream.flush.equal?(stream),
                  read: stream.read, closed_before: stream.closed? }
        stream.close_read
        facts[:read_after_close_read] = (stream.read rescue $!.class)
        stream.close_write
        facts[:write_after_close] = (stream.write("x") rescue $!.class)
        facts[:closed] = stream.closed?
        stream.close
        facts[:shovel] = facts[:shovel].equal?(stream)
        seen << facts
      end
      [200, { "content-type" => "text/plain" }, body]
    end
    with_worker(app) do |port|
      response = http_post(port, "/", "request body")
      expect(response.body.force_encoding("UTF-8")).to eq("héllo!")
    end
    expect(seen.pop).to eq(written: 6, shovel: true, flushed: true, read: "request body", closed_before: false,
                           read_after_close_read: IOError, write_after_close: IOError, closed: true)
  end

  it "takes the connection over for a 101: the body gets the raw IO, bytes pipelined behind the request first" do
    app = lambda do |_env|
      body = lambda do |io|
        io.write("upgraded:#{io.read(5)}")
      end
      [101, { "upgrade" => "echo", "connection" => "upgrade" }, body]
    end
    with_worker(app) do |port|
      out = raw_exchange(port, "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\nhello")
      head, rest = out.split("\r\n\r\n", 2)
      expect(head).to start_with("HTTP/1.1 101 Switching Protocols\r\n")
      expect(head).to include("upgrade: echo")
      # The stream is closed once #call returns.
      expect(rest).to eq("upgraded:hello")
      out, = Open3.capture2e("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--http2-prior-knowledge",
                             "http://127.0.0.1:#{port}/")
      expect(out).to eq("500")
    end
  end

  it "does not call a streaming body for HEAD, and closes every kind of body exactly once" do
    closes = []
    called = []
    callable = Class.new do
      define_method(:initialize) { |tag| @tag = tag }
      define_method(:call) do |stream|
        called << @tag
        stream.write(@tag.to_s)
        raise "boom after writing" if @tag == :raising
      end
      define_method(:close) { closes << @tag }
    end
    app = lambda do |env|
      [200, {}, callable.new(env["PATH_INFO"].delete("/").to_sym)]
    end
    with_worker(app) do |port|
      expect(http_get(port, "/plain").body).to eq("plain")
      head = raw_exchange(port, "HEAD /head HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      expect(head).to start_with("HTTP/1.1 200")
      raw = raw_exchange(port, "GET /raising HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      # Raised after the head went out: the connection is aborted, so the
      # chunked body never looks complete.
      expect(raw).not_to end_with("0\r\n\r\n")
      wait_until { closes.size == 3 }
    end
    expect(called).to eq(%i[plain raising])
    expect(closes.sort).to eq(%i[head plain raising])
  end

  it "makes write wait without the GVL for a slow client, then raise an IOError once the client is gone" do
    outcome = Queue.new
    app = lambda do |env|
      next [200, {}, ["hello"]] if env["PATH_INFO"] == "/hello"

      body = lambda do |stream|
        chunk = "x" * 65_536
        loop { stream.write(chunk) }
      rescue IOError => e
        outcome << e
        raise
      end
      [200, {}, body]
    end
    with_worker(app, thread_count: 2) do |port|
      slow = TCPSocket.new("127.0.0.1", port)
      slow.write("GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
      expect(slow.readpartial(100)).to start_with("HTTP/1.1 200")
      # The streaming thread now waits for the client to read. Had it kept
      # the GVL, the other app thread could not answer this.
      expect(http_get(port, "/hello").body).to eq("hello")
      slow.close
      error = Timeout.timeout(30) { outcome.pop }
      expect(error).to be_a(Hyperion::ClientDisconnected)
      expect(error).to be_a(IOError)
    end
  end

  describe "Server-Sent Events" do
    # An SSE app that flushes its first event, then blocks until the test
    # has received it: a server that held the event back until the app
    # went on (or until more bytes came) would never release it.
    def sse_app(style, received)
      lambda do |_env|
        headers = { "content-type" => "text/event-stream", "cache-control" => "no-cache" }
        case style
        when :each
          body = Enumerator.new do |out|
            out << "data: first\n\n"
            received.pop
            out << "data: second\n\n"
          end
          [200, headers, body]
        when :call
          body = lambda do |stream|
            stream.write("data: first\n\n")
            stream.flush
            received.pop
            stream.write("data: second\n\n")
            stream.close
          end
          [200, headers, body]
        end
      end
    end

    %i[each call].each do |style|
      it "delivers the first event while the app is still blocked (#{style}, HTTP/1.1)" do
        received = Queue.new
        with_worker(sse_app(style, received)) do |port|
          socket = TCPSocket.new("127.0.0.1", port)
          socket.write("GET /events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
          seen = +""
          Timeout.timeout(20) { seen << socket.readpartial(4096) until seen.include?("data: first\n\n") }
          expect(seen).not_to include("second")
          received << :got_it
          Timeout.timeout(20) { seen << socket.readpartial(4096) until seen.include?("data: second\n\n") }
          socket.close
        end
      end

      it "delivers the first event while the app is still blocked (#{style}, HTTP/2)" do
        received = Queue.new
        with_worker(sse_app(style, received)) do |port|
          IO.popen(["curl", "-sN", "--http2-prior-knowledge", "http://127.0.0.1:#{port}/events"]) do |curl|
            seen = +""
            Timeout.timeout(20) { seen << curl.readpartial(4096) until seen.include?("data: first\n\n") }
            expect(seen).not_to include("second")
            received << :got_it
            Timeout.timeout(20) { seen << curl.readpartial(4096) until seen.include?("data: second\n\n") }
          end
        end
      end
    end
  end
end
