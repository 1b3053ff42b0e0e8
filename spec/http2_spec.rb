# frozen_string_literal: true

require "spec_helper"

# HTTP/2 (the h2 crate, driven by src/http2/): ALPN on TLS listeners, prior
# knowledge (h2c) on plain ones. Clients are curl, nghttp and h2load from
# nghttp2-client, and python h2 for raw frames (spec/support/h2_probe.py).
RSpec.describe "HTTP/2" do
  include H2Probe

  let(:pki) { TestPKI.new }
  let(:app) do
    lambda do |env|
      case env["PATH_INFO"]
      when "/slow" then sleep 1
      when "/grpc"
        body = Object.new
        def body.each = yield("\x00\x00\x00\x00\x02hi".b)
        def body.trailers = { "grpc-status" => "0", "grpc-message" => "fine" }
        return [200, { "content-type" => "application/grpc" }, body]
      when "/echo"
        return [200, { "content-type" => "application/octet-stream" }, [env["rack.input"].read]]
      end
      [200, { "content-type" => "text/plain", "connection" => "keep-alive" },
       [env.values_at("SERVER_PROTOCOL", "HTTP_HOST", "rack.url_scheme", "rack.hijack?").join(" ")]]
    end
  end

  def run_client(*command)
    out, status = Open3.capture2e(*command)
    expect(status).to be_success, "#{command.join(' ')}\n#{out}"
    out
  end

  it "speaks h2c with prior knowledge on a plain listener, HTTP/1.1 to everyone else" do
    with_worker(app) do |port|
      out = run_client("curl", "-s", "--http2-prior-knowledge", "-w", "\n%{http_version}", "http://127.0.0.1:#{port}/")
      expect(out).to eq("HTTP/2 127.0.0.1:#{port} http false\n2")
      out = run_client("curl", "-s", "-w", "\n%{http_version}", "http://127.0.0.1:#{port}/")
      expect(out).to eq("HTTP/1.1 127.0.0.1:#{port} http true\n1.1")
    end
  end

  it "negotiates h2 or http/1.1 over TLS with ALPN" do
    with_worker(app, tls: { cert: pki.path("chain.pem"), key: pki.path("server.key") }) do |port|
      common = ["curl", "-s", "--cacert", pki.path("root.pem"), "--resolve", "localhost:#{port}:127.0.0.1",
                "-w", "\n%{http_version}"]
      expect(run_client(*common, "--http2", "https://localhost:#{port}/"))
        .to eq("HTTP/2 localhost:#{port} https false\n2")
      expect(run_client(*common, "--http1.1", "https://localhost:#{port}/"))
        .to eq("HTTP/1.1 localhost:#{port} https true\n1.1")
    end
  end

  it "answers 100 concurrent streams on one connection (h2load), all 2xx" do
    with_worker(app, thread_count: 4) do |port|
      out = run_client("h2load", "-n", "2000", "-c", "1", "-m", "100", "http://127.0.0.1:#{port}/")
      expect(out).to match(/2000 succeeded, 0 failed, 0 errored/)
      expect(out).to include("status codes: 2000 2xx")
    end
  end

  it "keeps POST bodies intact" do
    payload = Random.new(7).bytes(300_000)
    file = File.join(Dir.mktmpdir("hyperion-h2"), "payload.bin")
    File.binwrite(file, payload)
    with_worker(app) do |port|
      out, status = Open3.capture2("curl", "-s", "--http2-prior-knowledge", "--data-binary", "@#{file}",
                                   "http://127.0.0.1:#{port}/echo", binmode: true)
      expect(status).to be_success
      expect(out.b).to eq(payload)
    end
  end

  it "sends a body's trailers as trailing HEADERS (gRPC status)" do
    with_worker(app) do |port|
      out = run_client("nghttp", "-v", "http://127.0.0.1:#{port}/grpc").b
      data_at = out.index("recv DATA frame")
      trailer_at = out.index("recv (stream_id=13) grpc-status: 0")
      expect([data_at, trailer_at]).to all(be_a(Integer))
      expect(trailer_at).to be > data_at
      expect(out).to include("grpc-message: fine")
    end
  end

  it "sends no body for HEAD, 204 and 304 over HTTP/2" do
    app = ->(env) { [env["PATH_INFO"][1..].to_i.nonzero? || 200, { "content-type" => "text/plain" }, ["body text"]] }
    with_worker(app, max_uri_bytes: 100) do |port|
      head = run_client("curl", "-s", "-I", "--http2-prior-knowledge", "http://127.0.0.1:#{port}/")
      expect(head).to start_with("HTTP/2 200")
      expect(head).to include("content-length: 9")
      expect(head).not_to include("body text")
      %w[204 304].each do |status|
        out = run_client("nghttp", "-v", "http://127.0.0.1:#{port}/#{status}")
        expect(out).to include(":status: #{status}")
        expect(out).not_to include("recv DATA frame")
      end
      # A refusal the server writes itself has a body; HEAD still gets none.
      out = run_client("nghttp", "-v", "-H", ":method: HEAD", "http://127.0.0.1:#{port}/#{'x' * 200}")
      expect(out).to include(":status: 414")
      expect(out).not_to include("recv DATA frame")
    end
  end

  it "sends date and, for a body of known length, content-length" do
    with_worker(app) do |port|
      out = run_client("nghttp", "-v", "http://127.0.0.1:#{port}/")
      expect(out).to match(/recv \(stream_id=13\) date: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT/)
      expect(out).to include("recv (stream_id=13) content-length: #{"HTTP/2 127.0.0.1:#{port} http false".bytesize}")
    end
  end

  it "keeps h2's rapid-reset protection: a burst of opened-and-reset streams gets GOAWAY ENHANCE_YOUR_CALM" do
    with_worker(app) do |port|
      expect(h2_probe(:reset_flood, port, 500)["goaway"]).to eq(11)
      expect(run_client("curl", "-s", "--http2-prior-knowledge", "http://127.0.0.1:#{port}/")).to start_with("HTTP/2")
    end
  end

  it "closes a connection after idle_timeout once the client cancelled the only request in flight" do
    with_worker(app, idle_timeout: 1) do |port|
      seen = h2_probe(:reset_then_idle, port, "/slow", 60)
      expect(seen["closed"]).to be(true), seen.inspect
      expect(seen["closed_after"]).to be < 30 # idle_timeout (1 s), not the probe's patience (60 s)
    end
  end

  it "drops connection-specific response headers" do
    with_worker(app) do |port|
      out = run_client("nghttp", "-v", "http://127.0.0.1:#{port}/")
      expect(out).to include("content-type: text/plain")
      expect(out).not_to include("connection: keep-alive")
    end
  end

  it "runs the streams of one connection concurrently: a slow stream does not hold up the others" do
    # /slow answers only once the client, having had /fast answered, asks for
    # /release on the same connection; were the streams run one at a time it
    # would give up waiting and answer first.
    released = Queue.new
    app = lambda do |env|
      case env["PATH_INFO"]
      when "/slow"
        body = begin
          Timeout.timeout(30) { released.pop } && "released"
        rescue Timeout::Error
          "gave up"
        end
        [200, {}, [body]]
      when "/release"
        released << true
        [200, {}, ["ok"]]
      else [200, {}, ["fast"]]
      end
    end
    with_worker(app, thread_count: 4) do |port|
      seen = h2_probe(:slow_then_fast, port)
      expect(seen["end_order"].first).to eq("/fast"), seen.inspect
      expect(seen["bodies"]).to include("/slow" => "released", "/fast" => "fast"), seen.inspect
    end
  end

  it "applies h2_settings and rejects out-of-range values" do
    with_worker(app, h2_settings: { max_concurrent_streams: 7, max_frame_size: 32_768 }) do |port|
      out = run_client("nghttp", "-v", "http://127.0.0.1:#{port}/")
      expect(out).to include("SETTINGS_MAX_CONCURRENT_STREAMS(0x03):7", "SETTINGS_MAX_FRAME_SIZE(0x05):32768")
    end
    expect { Hyperion::Worker.new(host: "127.0.0.1", port: 0, app: app, read_timeout: 5, h2_settings: { max_frame_size: 1 }) }
      .to raise_error(ArgumentError, /max_frame_size must be between 16384/)
  end

  describe "gRPC-style streaming input (content-type: application/grpc)" do
    it "starts the app while the client still sends, and rack.input#each sees DATA as it comes" do
      seen = Queue.new
      first_chunk = Queue.new
      app = lambda do |env|
        chunks = []
        env["rack.input"].each do |chunk|
          first_chunk << chunk if chunks.empty?
          chunks << chunk
        end
        env["rack.input"].rewind
        seen << { chunks: chunks, again: env["rack.input"].read, class: env["rack.input"].class }
        [200, { "content-type" => "application/grpc" }, ["got #{chunks.join}"]]
      end
      with_worker(app) do |port|
        Open3.popen3("curl", "-s", "--http2-prior-knowledge", "-H", "content-type: application/grpc",
                     "-T", "-", "http://127.0.0.1:#{port}/svc/Method") do |stdin, stdout, _stderr, wait|
          stdin.write("first;")
          stdin.flush
          # The rest is sent only once the app has the first DATA: a server
          # that waited for the whole body would never start the app.
          expect(Timeout.timeout(30) { first_chunk.pop }).to eq("first;")
          stdin.write("second")
          stdin.close
          expect(stdout.read).to eq("got first;second")
          expect(wait.value).to be_success
        end
        result = seen.pop
        expect(result[:class]).to eq(Hyperion::StreamInput)
        expect(result[:chunks].first).to eq("first;")
        expect(result[:chunks].join).to eq("first;second")
        expect(result[:again]).to eq("first;second")
      end
    end

    it "reads a streamed body with read(len), gets and read, and enforces max_body_bytes" do
      app = lambda do |env|
        input = env["rack.input"]
        parts = [input.read(3), input.gets, input.read]
        [200, {}, [parts.inspect]]
      rescue Hyperion::Error => e
        [413, {}, [e.message]]
      end
      with_worker(app, max_body_bytes: 100) do |port|
        out = run_client("curl", "-s", "--http2-prior-knowledge", "-H", "content-type: application/grpc",
                         "--data-binary", "abcdef\nrest", "http://127.0.0.1:#{port}/")
        expect(out).to eq('["abc", "def\\n", "rest"]')
        # Declared too large: refused from Content-Length before the app runs.
        out, = Open3.capture2("curl", "-s", "--http2-prior-knowledge", "-H", "content-type: application/grpc",
                              "--data-binary", "x" * 500, "-w", " %{http_code}", "http://127.0.0.1:#{port}/")
        expect(out).to eq("Payload Too Large\n 413")
        # Streamed without a length: the read that crosses the limit raises,
        # and the answer goes out while the client is still sending, followed
        # by RST_STREAM NO_ERROR (RFC 9113 §8.1). (curl 7.88 drops an answer
        # that arrives before its upload ends, so it cannot be the client.)
        seen = h2_probe(:early_answer, port, "/", 500)
        expect(seen).to include("status" => "413", "body" => "request body larger than max_body_bytes",
                                "response_ended" => true, "reset" => 0), seen.inspect
      end
    end
  end

  describe "streams stalled on flow control (write_timeout)" do
    it "resets a stream that gets no window, GOAWAYs a connection that makes no progress, serves everyone else" do
      with_worker(app, write_timeout: 1, thread_count: 4) do |port|
        stalling = Thread.new { h2_probe(:stall, port, 50, 90) }
        # Others are served while the stalls last.
        expect(run_client("curl", "-s", "--http2-prior-knowledge", "http://127.0.0.1:#{port}/"))
          .to eq("HTTP/2 127.0.0.1:#{port} http false")
        seen = stalling.value
        expect(seen["responses"]).to eq(50), seen.inspect # every head went out; only DATA waited
        expect(seen["resets"]).to eq({ "8" => 50 }), seen.inspect # RST_STREAM CANCEL each
        expect(seen["seconds"]).to be < 60 # write_timeout (1 s), not the probe's patience (90 s)
        expect(seen["goaway"]).to eq(0), seen.inspect
        expect(seen["closed_after"]).to be_a(Float), seen.inspect
        out = run_client("h2load", "-n", "200", "-c", "2", "-m", "10", "http://127.0.0.1:#{port}/")
        expect(out).to match(/200 succeeded, 0 failed, 0 errored/)
      end
    end

    it "closes a stuck connection whose client does not answer the GOAWAY's PING" do
      with_worker(app, write_timeout: 1) do |port|
        seen = h2_probe(:stall_mute, port, 10, 90)
        expect(seen["resets"]).to eq({ "8" => 10 }), seen.inspect
        expect(seen["goaways"]).to eq([0, 0]), seen.inspect # the graceful one, then the closing one
        expect(seen["closed_after"]).to be_a(Float), seen.inspect
      end
    end

    it "never cuts a response whose body waits on the app" do
      slow = lambda do |_env|
        body = Enumerator.new do |out|
          out << "first;"
          sleep 2.5
          out << "second"
        end
        [200, { "content-type" => "text/plain" }, body]
      end
      with_worker(slow, write_timeout: 1) do |port|
        expect(run_client("curl", "-s", "--http2-prior-knowledge", "http://127.0.0.1:#{port}/")).to eq("first;second")
      end
    end
  end

  describe "control-frame budget" do
    it "answers a PING flood and a SETTINGS flood with GOAWAY ENHANCE_YOUR_CALM and closes" do
      with_worker(app) do |port|
        %i[ping_flood settings_flood].each do |flood|
          seen = h2_probe(flood, port, 60)
          expect(seen["goaway"]).to eq(11), "#{flood}: #{seen.inspect}"
          expect(seen["closed"]).to be(true), "#{flood}: #{seen.inspect}"
          expect(seen["ping_acks"] + seen["settings_acks"]).to be < 5_000, "#{flood}: #{seen.inspect}"
        end
        expect(run_client("curl", "-s", "--http2-prior-knowledge", "http://127.0.0.1:#{port}/"))
          .to eq("HTTP/2 127.0.0.1:#{port} http false")
      end
    end

    it "leaves a client that sends a few PINGs and SETTINGS alone" do
      with_worker(app) do |port|
        seen = h2_probe(:polite, port)
        expect(seen).to include("status" => "200", "goaway" => nil, "closed" => false, "ping_acks" => 5)
        expect(seen["settings_acks"]).to eq(4) # the three sent, and the one of the preface
      end
    end
  end

  it "sends GOAWAY on TERM and lets the stream in flight finish" do
    dir = Dir.mktmpdir("hyperion-h2-drain")
    started = File.join(dir, "started")
    File.write(File.join(dir, "config.ru"), <<~RUBY)
      run ->(_) { File.write(#{started.dump}, ""); sleep 1; [200, {}, ['drained']] }
    RUBY
    with_cli(chdir: dir) do |port, pid|
      client = Thread.new { Open3.capture2e("nghttp", "-v", "http://127.0.0.1:#{port}/") }
      # TERM once the request is in flight.
      Timeout.timeout(30) { sleep 0.05 until File.exist?(started) }
      Process.kill("TERM", pid)
      out, status = client.value
      expect(status).to be_success, out
      expect(out).to include("recv GOAWAY frame")
      expect(out).to include("drained")
      _, server = Process.wait2(pid)
      expect(server.exitstatus).to eq(0)
    end
  end
end
