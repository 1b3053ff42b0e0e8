# frozen_string_literal: true

require "spec_helper"

# `rake gc_stress` runs these with GC.stress on while requests are served, so
# a Ruby object that Rust holds without marking it would be collected and the
# request would crash or answer garbage. Without HYPERION_GC_STRESS they run
# as ordinary examples.
RSpec.describe "serving under GC.stress", :gc_stress, timeout: 300 do
  it "builds envs, reads bodies and writes Array, streamed and each-able-header responses" do
    spec = self
    app = lambda do |env|
      compact_here
      case env["PATH_INFO"]
      when "/env" then TestApps.env_dump.call(env)
      when "/stream" then [200, {}, Enumerator.new { |y| %w[s t r e a m].each { |c| compact_here; y << c } }]
      when "/raise" then raise "under stress"
      when "/big" then [200, {}, [("b" * 1023 + "\n") * 64, "tail"]]
      else
        headers = Object.new
        headers.define_singleton_method(:each) { |&b| spec.compact_here; b.call("x-each", "v") }
        [200, headers, [env["rack.input"].read]]
      end
    end
    with_worker(app, thread_count: 3) do |port|
      gc_stress do
        env_raw = raw_exchange(port, "POST /env?q=1 HTTP/1.1\r\nHost: h:1\r\nContent-Length: 3\r\nX-A: b\r\n" \
                                     "Connection: close\r\n\r\nabc")
        status, _headers, body = parse_responses(env_raw).first
        expect(status).to eq(200)
        expect(JSON.parse(body)).to include("QUERY_STRING" => "q=1", "HTTP_X_A" => "b", "body" => "abc",
                                            "SERVER_NAME" => "h", "SERVER_PORT" => "1")
        stream = parse_responses(raw_exchange(port, "GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        expect(stream.first.values_at(0, 2)).to eq([200, "stream"])
        big = parse_responses(raw_exchange(port, "GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        expect(big.first.values_at(0, 2)).to eq([200, ("b" * 1023 + "\n") * 64 + "tail"])
        failed = parse_responses(raw_exchange(port, "GET /raise HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        expect(failed.first.first).to eq(500)
        echoed = parse_responses(raw_exchange(port, "POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n" \
                                                    "Connection: close\r\n\r\nok"))
        expect(echoed.first.values_at(0, 2)).to eq([200, "ok"])
        expect(echoed.first[1]["x-each"]).to eq(["v"])
      end
    end
  end

  it "streams a gRPC-style request body into rack.input over h2c" do
    app = lambda do |env|
      chunks = []
      env["rack.input"].each { |c| compact_here; chunks << c }
      [200, {}, [chunks.join]]
    end
    with_worker(app) do |port|
      out = gc_stress do
        Open3.capture2("curl", "-s", "--http2-prior-knowledge", "-H", "content-type: application/grpc",
                       "-T", "-", "http://127.0.0.1:#{port}/", stdin_data: "streamed body").first
      end
      expect(out).to eq("streamed body")
    end
  end

  it "sends 103 Early Hints from a Hash of multi-line values, over HTTP/1.1 and h2c" do
    app = lambda do |env|
      env["rack.early_hints"].call({ "link" => "</a.css>; rel=preload\n</b.js>; rel=preload" })
      [200, {}, ["hinted"]]
    end
    with_worker(app, early_hints: true) do |port|
      %w[--http1.1 --http2-prior-knowledge].each do |version|
        out = gc_stress { Open3.capture2e("curl", "-sv", version, "http://127.0.0.1:#{port}/").first }
        expect(out.lines.grep(/\A< (HTTP\S* 103|link)/).size).to eq(3), out
        expect(out).to end_with("hinted")
      end
    end
  end

  it "keeps the app and hooks alive while the worker runs" do
    calls = []
    config = Hyperion::Config.new
    config.on_worker_boot << ->(i) { calls << [:boot, i] }
    config.on_worker_shutdown << ->(i) { calls << [:shutdown, i] }
    gc_stress do
      with_worker(->(_) { [200, { "a" => "b" }, ["alive"]] }, config: config) do |port|
        GC.start
        compact_here
        raw = raw_exchange(port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        expect(parse_responses(raw).first.last).to eq("alive")
      end
    end
    expect(calls).to eq([[:boot, 0], [:shutdown, 0]])
  end

  # The control listener's socket and handler are held by Rust (marked by
  # the Worker); the handler runs on the control thread; stats pages are
  # Rust objects owned by Ruby ones.
  it "keeps the control listener's socket and handler alive and answers /stats and /gc-stats" do
    dir = Dir.mktmpdir("hyperion-gc-control")
    paths = Array.new(3) { |i| File.join(dir, "c#{i}.sock") }
    sockets = paths.map { |path| UNIXServer.new(path) }
    listeners = Array.new(3) { TCPServer.new("127.0.0.1", 0) }
    pages = Array.new(3) { Hyperion::StatsPage.new }
    spec = self
    app = ->(_env) { [200, {}, ["served"]] }
    workers = gc_stress(compact_every_gc: true) do
      listeners.each_with_index.map do |listener, i|
        handler = lambda do |name|
          spec.compact_here
          [200, JSON.generate({ "answered" => name.dup }), nil]
        end
        Hyperion::Worker.new(host: "127.0.0.1", port: 0, app: app, read_timeout: spec_read_timeout,
                             listener: listener, log_format: "json".b, stats: pages[i],
                             control: { "listener" => sockets[i], auth_token: nil, "handler" => handler })
      end
    end
    GC.start
    runner = Thread.new { workers.last.run }
    runner.report_on_exception = false
    port = listeners.last.local_address.ip_port
    control = "unix://#{paths.last}"
    wait_until(60) { control_get(control, "/ready")[0] == 200 }
    expect(curl_get("http://127.0.0.1:#{port}/")).to eq("served")
    gc_stress do
      expect(control_get(control, "/gc-stats")[0, 2]).to eq([200, '{"answered":"gc-stats"}'])
      expect(JSON.parse(control_get(control, "/stats")[1])).to include("requests_count" => 1)
      text = Hyperion::StatsPage.prometheus(pages, 3, 1, 1, 0)
      expect(text).to include('hyperion_requests_total{status_class="2xx"} 1')
      expect(pages.last.status).to include(requests_count: 1, max_threads: 5)
      pages.first.absorb(pages.last)
      expect(pages.first.status[:requests_count]).to eq(1)
    end
  ensure
    workers&.last&.stop
    runner&.join(30)
    (Array(listeners) + Array(sockets)).each { |l| l.close unless l.closed? }
  end

  it "hijacks (full and partial), streams Rack 3 bodies and runs the response callbacks" do
    calls = Queue.new
    app = lambda do |env|
      compact_here
      env["rack.after_reply"] << -> { compact_here; calls << :after_reply }
      env["rack.response_finished"] << ->(e, status, _h, _err) { compact_here; calls << [e["PATH_INFO"], status] }
      case env["PATH_INFO"]
      when "/full"
        env["rack.hijack"].call
        GC.start
        io = env["rack.hijack"].call
        io.write("full:#{io.read(5)}")
        io.close
        [200, {}, []]
      when "/partial"
        [200, { "rack.hijack" => lambda { |io|
          compact_here
          io.write("partial")
          io.close
        } }, []]
      else
        [200, {}, lambda { |stream|
          %w[s t r].each { |c| compact_here; stream << c }
          stream.write(stream.read)
        }]
      end
    end
    with_worker(app, thread_count: 2) do |port|
      gc_stress do
        expect(raw_exchange(port, "GET /full HTTP/1.1\r\nHost: x\r\n\r\nearly")).to eq("full:early")
        expect(raw_exchange(port, "GET /partial HTTP/1.1\r\nHost: x\r\n\r\n")).to end_with("\r\n\r\npartial")
        raw = raw_exchange(port, "POST /stream HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        expect(parse_responses(raw).first.values_at(0, 2)).to eq([200, "strok"])
        recorded = Timeout.timeout(300) { Array.new(6) { calls.pop } }
        expect(recorded - [:after_reply]).to contain_exactly(["/full", 200], ["/partial", 200], ["/stream", 200])
      end
    end
  end

  # Worker.new converts option Hashes while Ruby may move their values
  # (compaction): binary (non-UTF-8) Strings make the conversion allocate.
  it "builds Workers from tls: and h2_settings: Hashes of binary Strings and serves TLS with one" do
    pki = TestPKI.new
    listeners = Array.new(5) { TCPServer.new("127.0.0.1", 0) }
    app = ->(env) { [200, {}, [env["rack.url_scheme"]]] }
    workers = gc_stress(compact_every_gc: true) do
      listeners.map do |listener|
        Hyperion::Worker.new(host: "127.0.0.1", port: 0, app: app, read_timeout: spec_read_timeout,
                             listener: listener,
                             tls: { "cert" => pki.path("chain.pem").b, key: pki.path("server.key").b,
                                    "verify_mode" => "none".b },
                             h2_settings: { "max_concurrent_streams" => 50, max_frame_size: 16_384 })
      end
    end
    GC.start
    runner = Thread.new { workers.last.run }
    runner.report_on_exception = false
    url = "https://127.0.0.1:#{listeners.last.local_address.ip_port}/"
    body = gc_stress { Open3.capture2("curl", "-sk", "--max-time", "300", "--retry", "5", "--retry-connrefused", url).first }
    expect(body).to eq("https")
  ensure
    workers&.last&.stop
    runner&.join(30)
    listeners&.each { |l| l.close unless l.closed? }
  end

  it "builds Workers from remote_address: and proxy_protocol: of binary Strings and serves with one" do
    keywords = [{ remote_address: { "header" => "X-Real-IP".b } }, { remote_address: "10.1.1.1".b },
                { remote_address: { proxy_protocol: "V2".b } }, { proxy_protocol: "v1".b }]
    listeners = keywords.map { TCPServer.new("127.0.0.1", 0) }
    app = ->(env) { [200, {}, [env["REMOTE_ADDR"]]] }
    workers = gc_stress(compact_every_gc: true) do
      keywords.zip(listeners).map do |given, listener|
        Hyperion::Worker.new(host: "127.0.0.1", port: 0, app: app, read_timeout: spec_read_timeout,
                             listener: listener, **given)
      end
    end
    GC.start
    runner = Thread.new { workers.first.run }
    runner.report_on_exception = false
    url = "http://127.0.0.1:#{listeners.first.local_address.ip_port}/"
    body = gc_stress do
      Open3.capture2("curl", "-s", "--max-time", "300", "--retry", "5", "--retry-connrefused", "-H",
                     "X-Real-IP: 192.0.2.5, 10.0.0.1", url).first
    end
    expect(body).to eq("192.0.2.5")
  ensure
    workers&.first&.stop
    runner&.join(30)
    listeners&.each { |l| l.close unless l.closed? }
  end
end
