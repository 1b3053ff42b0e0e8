# frozen_string_literal: true

require "spec_helper"

# Timeouts, Expect, drain and fairness: the slow and greedy clients of the
# HTTP/1.1 hardening issue. Malformed input is in hostile_input_spec.rb.
RSpec.describe "HTTP/1.1 against slow and greedy clients" do
  let(:calls) { Queue.new }
  let(:app) { ->(env) { calls << env["PATH_INFO"]; [200, { "content-type" => "text/plain" }, ["ok #{env['PATH_INFO']}"]] } }

  def connect(port)
    TCPSocket.new("127.0.0.1", port)
  end

  describe "read_timeout" do
    it "answers 408 and closes when a new connection sends nothing" do
      with_worker(app, read_timeout: 0.3) do |port|
        socket = connect(port)
        expect(read_all(socket, 3)).to start_with("HTTP/1.1 408").and include("connection: close")
        expect(calls).to be_empty
      end
    end

    it "answers 408 to a head trickled byte by byte, and the app is never called" do
      with_worker(app, read_timeout: 0.5) do |port|
        socket = connect(port)
        trickle = "GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: #{'a' * 100}"
        begin
          trickle.each_char do |c|
            socket.write(c) # one byte every 50 ms: the head takes far longer than read_timeout
            sleep 0.05
          end
        rescue Errno::EPIPE, Errno::ECONNRESET
          nil # the server answered and closed while we were still trickling
        end
        expect(read_all(socket, 3)).to start_with("HTTP/1.1 408")
        expect(calls).to be_empty
        expect(http_get(port, "/fine").body).to eq("ok /fine")
      end
    end
  end

  describe "max_request_read_seconds" do
    it "also bounds the head: a stalled head gets 408 and close after it, though read_timeout is longer" do
      hello = File.join(ServerHelpers::ROOT, "examples/hello.ru")
      with_cli("--max-request-read-seconds", "1", "--read-timeout", "60", hello) do |port|
        socket = connect(port)
        socket.write("GET /stall HT")
        expect(read_all(socket, 20)).to start_with("HTTP/1.1 408").and include("connection: close")
        expect(socket.read_nonblock(1, exception: false)).to be_nil # closed, not merely quiet
      end
    end
  end

  describe "max_connections" do
    def get(socket, path, close: false)
      socket.write("GET #{path} HTTP/1.1\r\nHost: x\r\n#{"Connection: close\r\n" if close}\r\n")
    end

    it "stops accepting at the limit: a third connection is answered once one of the first two closes" do
      with_worker(app, max_connections: 2) do |port|
        first, second = Array.new(2) { connect(port) }
        [first, second].each_with_index do |socket, i|
          get(socket, "/keep#{i}")
          expect(socket.readpartial(4096)).to end_with("ok /keep#{i}")
        end
        third = connect(port) # completes in the kernel's backlog
        get(third, "/third", close: true)
        expect(third.wait_readable(1)).to be_nil, "answered while two connections were open"
        expect(calls.size).to eq(2)
        first.close
        expect(read_all(third, 10)).to start_with("HTTP/1.1 200").and end_with("ok /third")
        get(second, "/again")
        expect(second.readpartial(4096)).to end_with("ok /again")
      end
    end

    it "counts an HTTP/2 connection as one" do
      with_worker(app, max_connections: 1) do |port|
        h2 = connect(port)
        h2.write("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00".b) # preface, empty SETTINGS
        expect(h2.readpartial(4096).byteslice(3, 1)).to eq("\x04".b) # the server's SETTINGS: served
        waiting = connect(port)
        get(waiting, "/after-h2", close: true)
        expect(waiting.wait_readable(1)).to be_nil, "answered while the HTTP/2 connection was open"
        h2.close
        expect(read_all(waiting, 10)).to start_with("HTTP/1.1 200").and end_with("ok /after-h2")
      end
    end
  end

  it "closes an idle keep-alive connection quietly after idle_timeout" do
    with_worker(app, idle_timeout: 0.3) do |port|
      socket = connect(port)
      socket.write("GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
      expect(socket.readpartial(4096)).to start_with("HTTP/1.1 200")
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      expect(read_all(socket, 5)).to eq("") # EOF with no bytes: no 408 for an idle connection
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be_between(0.2, 3)
    end
  end

  it "lets a keep-alive connection that keeps working outlive idle_timeout" do
    with_worker(app, idle_timeout: 0.4) do |port|
      socket = connect(port)
      5.times do |i|
        socket.write("GET /#{i} HTTP/1.1\r\nHost: x\r\n\r\n")
        expect(socket.readpartial(4096)).to end_with("ok /#{i}")
        sleep 0.2
      end
    end
  end

  describe "a keep-alive connection idle past the 1 s park threshold (hyper state dropped, socket kept)" do
    it "serves its next request, including one split across the park" do
      with_worker(app, idle_timeout: 10) do |port|
        socket = connect(port)
        socket.write("GET /before HTTP/1.1\r\nHost: x\r\n\r\n")
        expect(socket.readpartial(4096)).to end_with("ok /before")
        sleep 1.5
        socket.write("GET /after HTTP/1.1\r\nHo")
        sleep 0.1
        socket.write("st: x\r\n\r\nGET /pipelined HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        bodies = parse_responses(read_all(socket, 3)).map(&:last)
        expect(bodies).to eq(["ok /after", "ok /pipelined"])
      end
    end

    it "is still closed quietly at idle_timeout, and at once on stop" do
      with_worker(app, idle_timeout: 2) do |port, worker|
        parked = connect(port)
        parked.write("GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        parked.readpartial(4096)
        started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        expect(read_all(parked, 5)).to eq("")
        expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be_between(1.5, 4)

        other = connect(port)
        other.write("GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        other.readpartial(4096)
        sleep 1.3 # parked now
        worker.stop
        expect(read_all(other, 2)).to eq("")
      end
    end
  end

  describe "write_timeout" do
    it "drops a client that stops reading a large response, and the thread is free meanwhile" do
      big = "x" * (32 * 1024 * 1024)
      app = ->(env) { [200, {}, [env["PATH_INFO"] == "/big" ? big : "small"]] }
      with_worker(app, thread_count: 1, write_timeout: 0.5) do |port|
        stalled = connect(port)
        stalled.write("GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        sleep 0.2
        expect(http_get(port, "/other").body).to eq("small") # the only Ruby thread is not held
        sleep 1.5
        received = 0
        begin
          loop { received += stalled.read_nonblock(1 << 20).bytesize }
        rescue IO::WaitReadable
          retry if stalled.wait_readable(2)
        rescue EOFError, Errno::ECONNRESET
          nil
        end
        expect(received).to be < big.bytesize # the server gave up before sending it all
      end
    end

    it "releases a Ruby thread streaming to a client that stopped reading" do
      closed = Queue.new
      endless = Class.new do
        define_method(:each) { |&chunk| loop { chunk.call("y" * 65_536) } }
        define_method(:close) { closed << true }
      end
      app = ->(env) { env["PATH_INFO"] == "/stream" ? [200, {}, endless.new] : [200, {}, ["free"]] }
      with_worker(app, thread_count: 1, write_timeout: 0.5) do |port|
        stalled = connect(port)
        stalled.write("GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        expect(Timeout.timeout(10) { closed.pop }).to be(true)
        expect(http_get(port, "/after").body).to eq("free")
      ensure
        stalled&.close
      end
    end
  end

  describe "Expect: 100-continue" do
    it "sends 100 Continue when the body will be read" do
      with_worker(->(env) { [200, {}, [env["rack.input"].read]] }) do |port|
        socket = connect(port)
        socket.write("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        expect(socket.readpartial(4096)).to start_with("HTTP/1.1 100 Continue")
        socket.write("hello")
        expect(read_all(socket, 1)).to start_with("HTTP/1.1 200").and end_with("hello")
      end
    end

    it "answers 413 without 100 Continue when the declared body is over the limit" do
      with_worker(app, max_body_bytes: 10) do |port|
        raw = raw_exchange(port, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n", wait: 2)
        expect(raw).to start_with("HTTP/1.1 413").and include("connection: close")
        expect(raw).not_to include("100 Continue")
        expect(calls).to be_empty
      end
    end
  end

  it "keeps RSS flat while a 100 MB upload streams to a temp file", timeout: 120 do
    dir = Dir.mktmpdir("hyperion-upload")
    File.write(File.join(dir, "config.ru"), "run ->(env) { [200, {}, [env['rack.input'].size.to_s]] }\n")
    with_cli(chdir: dir) do |port, pid|
      rss = -> { File.read("/proc/#{pid}/status")[/VmRSS:\s+(\d+)/, 1].to_i / 1024.0 }
      http_post(port, "/", "warm") # first request allocates the lazily built pieces
      before = rss.call
      socket = connect(port)
      socket.write("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: #{100 * 1024 * 1024}\r\nConnection: close\r\n\r\n")
      chunk = "z" * (1024 * 1024)
      peak = before
      100.times do
        socket.write(chunk)
        peak = [peak, rss.call].max
      end
      response = read_all(socket, 30)
      expect(response).to start_with("HTTP/1.1 200").and end_with((100 * 1024 * 1024).to_s)
      expect(peak - before).to be < 16, "RSS grew from #{before.round(1)} MB to #{peak.round(1)} MB"
    end
  end

  it "queues work per request: a pipelining keep-alive client does not starve a new connection" do
    slow = ->(env) { sleep 0.01 if env["PATH_INFO"].start_with?("/p"); [200, {}, [env["PATH_INFO"]]] }
    with_worker(slow, thread_count: 1) do |port|
      greedy = connect(port)
      greedy.write((1..200).map { |i| "GET /p#{i} HTTP/1.1\r\nHost: x\r\n\r\n" }.join)
      sleep 0.1
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      expect(http_get(port, "/newcomer").body).to eq("/newcomer")
      # 200 pipelined requests take ~2 s one after another; per-connection
      # queueing would make the newcomer wait for all of them.
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be < 1.0
      greedy.close
    end
  end

  it "does not hold Ruby threads for slowloris connections" do
    with_worker(app, thread_count: 1, read_timeout: 10) do |port|
      lorises = Array.new(50) { connect(port).tap { |s| s.write("GET / HTTP/1.1\r\nHost: x\r\n") } }
      expect(http_get(port, "/normal").body).to eq("ok /normal")
      lorises.each(&:close)
    end
  end

  describe "graceful drain" do
    it "finishes in-flight requests, says connection: close on a keep-alive request during the drain, " \
       "and closes idle connections at once" do
      gate = Queue.new
      app = lambda do |env|
        gate.pop if env["PATH_INFO"] == "/slow"
        [200, {}, ["done #{env['PATH_INFO']}"]]
      end
      with_worker(app, thread_count: 4) do |port, worker|
        idle = connect(port)
        idle.write("GET /warm HTTP/1.1\r\nHost: x\r\n\r\n")
        idle.readpartial(4096)
        busy = connect(port)
        busy.write("GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        sleep 0.2
        worker.stop
        expect(read_all(idle, 2)).to eq("") # idle keep-alive connection closed at once
        gate << true
        response = read_all(busy, 5)
        expect(response).to start_with("HTTP/1.1 200").and end_with("done /slow")
        expect(response.downcase).to include("connection: close")
      end
    end

    it "answers a request sent on an idle keep-alive connection just after the stop, with connection: close" do
      app = ->(env) { [200, {}, ["ok #{env['PATH_INFO']}"]] }
      with_worker(app) do |port, worker|
        busy = connect(port)
        busy.write("GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        busy.readpartial(4096)
        quiet = connect(port)
        quiet.write("GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        quiet.readpartial(4096)
        worker.stop
        # A client that had its next request on the way when the stop began.
        busy.write("GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        response = read_all(busy, 3)
        expect(response).to start_with("HTTP/1.1 200").and end_with("ok /second")
        expect(response.downcase).to include("connection: close")
        # One that sends nothing is closed after the grace (500 ms).
        started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        expect(read_all(quiet, 3)).to eq("")
        expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be < 2
      end
    end

    it "completes every request accepted before the stop, under load" do
      app = ->(_env) { sleep 0.005; [200, {}, ["ok"]] }
      with_worker(app, thread_count: 4) do |port, worker|
        results = Queue.new
        clients = Array.new(8) do
          Thread.new do
            Net::HTTP.start("127.0.0.1", port) do |http|
              50.times { results << http.get("/").code }
            end
          rescue Errno::ECONNREFUSED, Errno::ECONNRESET, EOFError, IOError => e
            results << e.class.name # only after the stop, for requests never accepted
          end
        end
        sleep 0.3
        worker.stop
        clients.each(&:join)
        codes = Array.new(results.size) { results.pop }
        expect(codes.count("200")).to be > 8
        expect(codes - %w[200]).to all(match(/ECONNREFUSED|ECONNRESET|EOFError|IOError/)) # never a 5xx
      end
    end
  end
end
