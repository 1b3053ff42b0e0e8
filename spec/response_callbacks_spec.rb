# frozen_string_literal: true

require "spec_helper"

# env["rack.after_reply"] (in order, no arguments) and
# env["rack.response_finished"] (reverse order, env/status/headers/error),
# run after the response's last byte, on every path.
RSpec.describe "rack.after_reply and rack.response_finished" do
  # An app that registers two callables in each Array, recording calls into
  # `calls` (a Queue); `respond` makes the response from the env.
  def recording_app(calls, &respond)
    lambda do |env|
      env["rack.after_reply"] << -> { calls << [:after_reply, 1] } << -> { calls << [:after_reply, 2] }
      2.times do |i|
        env["rack.response_finished"] << lambda do |*args|
          calls << [:response_finished, i + 1, args]
        end
      end
      respond.call(env)
    end
  end

  def drain(calls, count)
    Timeout.timeout(30) { Array.new(count) { calls.pop } }
  end

  it "runs after_reply in order, then response_finished in reverse with env, status, headers and nil" do
    calls = Queue.new
    seen_env = nil
    headers = { "content-type" => "text/plain" }
    app = recording_app(calls) do |env|
      seen_env = env
      [201, headers, ["created"]]
    end
    with_worker(app) do |port|
      expect(http_get(port, "/").code).to eq("201")
      recorded = drain(calls, 4)
      expect(recorded.map { |call| call.first(2) })
        .to eq([[:after_reply, 1], [:after_reply, 2], [:response_finished, 2], [:response_finished, 1]])
      env, status, given_headers, error = recorded.last.last
      expect(env).to equal(seen_env)
      expect([status, given_headers, error]).to eq([201, headers, nil])
      expect(given_headers).to equal(headers)
    end
  end

  it "passes nil status and headers and the exception when the app raised" do
    calls = Queue.new
    app = recording_app(calls) { |_env| raise ArgumentError, "app failed" }
    with_worker(app) do |port|
      expect(http_get(port, "/").code).to eq("500")
      recorded = drain(calls, 4)
      expect(recorded.map(&:first)).to eq(%i[after_reply after_reply response_finished response_finished])
      _env, status, headers, error = recorded.last.last
      expect([status, headers]).to eq([nil, nil])
      expect(error).to be_a(ArgumentError)
      expect(error.message).to eq("app failed")
    end
  end

  it "passes a Hyperion::ClientDisconnected when the client went away before the last byte" do
    calls = Queue.new
    big = "x" * (16 * 1024 * 1024)
    app = recording_app(calls) { |_env| [200, { "content-type" => "text/plain" }, [big]] }
    with_worker(app, write_timeout: 2) do |port|
      client = TCPSocket.new("127.0.0.1", port)
      client.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
      expect(client.readpartial(100)).to start_with("HTTP/1.1 200")
      client.close
      recorded = drain(calls, 4)
      _env, status, headers, error = recorded.last.last
      expect([status, headers]).to eq([200, { "content-type" => "text/plain" }])
      expect(error).to be_a(Hyperion::ClientDisconnected)
    end
  end

  it "runs them only once the last byte is written, and leaves a slow client's thread free without them" do
    calls = Queue.new
    big = "y" * (16 * 1024 * 1024)
    plain = ->(env) { env["PATH_INFO"] == "/hello" ? [200, {}, ["hello"]] : [200, {}, [big]] }
    with_worker(recording_app(calls) { |env| plain.call(env) }, thread_count: 1) do |port|
      slow = TCPSocket.new("127.0.0.1", port)
      slow.write("GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      expect(slow.readpartial(100)).to start_with("HTTP/1.1 200")
      # 16 MiB cannot all be in the socket buffers yet: the callbacks wait.
      sleep 0.5
      expect(calls).to be_empty
      received = 100
      Timeout.timeout(60) do
        loop do
          received += slow.readpartial(1 << 20).bytesize
        rescue EOFError
          break
        end
      end
      expect(received).to be > 16 * 1024 * 1024
      expect(drain(calls, 4).map(&:first)).to eq(%i[after_reply after_reply response_finished response_finished])
      slow.close
    end
    # Without callbacks, nothing waits: the only app thread answers another
    # request while the first client reads nothing.
    with_worker(plain, thread_count: 1) do |port|
      slow = TCPSocket.new("127.0.0.1", port)
      slow.write("GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
      expect(slow.readpartial(100)).to start_with("HTTP/1.1 200")
      expect(http_get(port, "/hello").body).to eq("hello")
      slow.close
    end
  end

  it "rescues and logs each callable on its own; the next still runs and the next request is unaffected" do
    calls = Queue.new
    app = lambda do |env|
      env["rack.after_reply"] << -> { raise "after_reply failed" } << -> { calls << :after_reply }
      env["rack.response_finished"] << ->(*) { calls << :response_finished } << ->(*) { raise "finished failed" }
      [200, { "content-length" => "2" }, ["ok"]]
    end
    with_worker(app) do |port|
      raw = raw_exchange(port, "GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      expect(parse_responses(raw).map { |status, _, body| [status, body] }).to eq([[200, "ok"], [200, "ok"]])
      expect(drain(calls, 4).tally).to eq(after_reply: 2, response_finished: 2)
    end
  end

  it "runs over HTTP/2, for streamed bodies, and after full and partial hijacks" do
    calls = Queue.new
    app = recording_app(calls) do |env|
      case env["PATH_INFO"]
      when "/stream" then [200, {}, ->(stream) { stream.write("streamed") }]
      when "/each" then [200, {}, %w[ea ch].each]
      when "/full"
        io = env["rack.hijack"].call
        io.write("full")
        io.close
        [200, { "x-ignored" => "1" }, []]
      when "/partial"
        [200, { "rack.hijack" => lambda { |io|
          io.write("partial")
          io.close
        } }, []]
      else [200, {}, ["plain"]]
      end
    end
    with_worker(app) do |port|
      out, status = Open3.capture2e("curl", "-s", "--http2-prior-knowledge", "http://127.0.0.1:#{port}/")
      expect([status.success?, out]).to eq([true, "plain"])
      expect(drain(calls, 4).last.last[1]).to eq(200)
      out, = Open3.capture2e("curl", "-s", "--http2-prior-knowledge", "http://127.0.0.1:#{port}/stream")
      expect(out).to eq("streamed")
      expect(drain(calls, 4).last.last[3]).to be_nil
      expect(http_get(port, "/each").body).to eq("each")
      expect(drain(calls, 4).last.last[3]).to be_nil
      expect(raw_exchange(port, "GET /full HTTP/1.1\r\nHost: x\r\n\r\n")).to eq("full")
      expect(drain(calls, 4).last.last[1, 3]).to eq([200, { "x-ignored" => "1" }, nil])
      expect(raw_exchange(port, "GET /partial HTTP/1.1\r\nHost: x\r\n\r\n")).to end_with("\r\n\r\npartial")
      expect(drain(calls, 4).last.last[3]).to be_nil
    end
  end
end
