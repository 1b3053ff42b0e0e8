# frozen_string_literal: true

require "spec_helper"

RSpec.describe "Rack responses on the wire" do
  def exchange(app, request = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with_worker(app) { |port| parse_responses(raw_exchange(port, request)) }
  end

  it "writes Content-Length for Array bodies and adds a Date header" do
    status, headers, body = exchange(->(_) { [200, { "content-type" => "text/plain" }, ["Hello, ", "World"]] }).first
    expect(status).to eq(200)
    expect(headers["content-length"]).to eq(["12"])
    expect(headers["date"].first).to match(/\A\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} GMT\z/)
    expect(body).to eq("Hello, World")
  end

  it "streams an #each body with chunked encoding, chunk by chunk" do
    counter = []
    body = TestApps::CountingBody.new(%w[one two three], counter)
    status, headers, text = exchange(->(_) { [200, {}, body] }).first
    expect([status, headers["transfer-encoding"], text]).to eq([200, ["chunked"], "onetwothree"])
    expect(counter).to eq([:closed])
  end

  it "keeps the app's Content-Length for an #each body" do
    body = TestApps::CountingBody.new(%w[ab cd], [])
    _status, headers, text = exchange(->(_) { [200, { "content-length" => "4" }, body] }).first
    expect([headers["content-length"], headers["transfer-encoding"], text]).to eq([["4"], nil, "abcd"])
  end

  it "splits String header values on newlines and writes Array values as repeated fields (Rack 2 and 3 forms)" do
    app = lambda do |_|
      [200, { "Set-Cookie" => "a=1\nb=2", "x-multi" => %w[one two], "rack.hidden" => "no", "Content-Type" => "text/plain" },
       ["ok"]]
    end
    _status, headers, = exchange(app).first
    expect(headers["set-cookie"]).to eq(%w[a=1 b=2])
    expect(headers["x-multi"]).to eq(%w[one two])
    expect(headers).not_to have_key("rack.hidden")
  end

  it "accepts any #each-able headers object (Rack 2)" do
    headers_object = Class.new do
      def each
        yield "x-from-each", "yes"
      end
    end.new
    _status, headers, = exchange(->(_) { [200, headers_object, ["ok"]] }).first
    expect(headers["x-from-each"]).to eq(["yes"])
  end

  it "answers HEAD with the Content-Length a GET gets, and no body" do
    with_worker(->(_) { [200, { "content-type" => "text/plain" }, ["Hello, ", "World"]] }) do |port|
      raw = raw_exchange(port, "HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      expect(raw).to include("content-length: 12\r\n")
      expect(raw).to end_with("\r\n\r\n")
    end
  end

  it "never sends a body for HEAD, 204 and 304, and still closes the body" do
    counter = []
    app = ->(env) { [env["PATH_INFO"] == "/304" ? 304 : 200, {}, TestApps::CountingBody.new(["body"], counter)] }
    with_worker(app) do |port|
      raw = raw_exchange(port, "HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET /304 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      expect(raw).not_to include("body")
      expect(raw.scan(%r{HTTP/1\.1 (\d{3})}).flatten).to eq(%w[200 304])
    end
    status, headers, body = exchange(->(_) { [204, {}, ["ignored"]] }).first
    expect([status, body, headers["content-length"]]).to eq([204, "", nil])
    expect(counter).to eq(%i[closed closed])
  end

  # Large chunks go to the socket without a copy (src/ruby/pinned.rs): what
  # the app does to its Strings afterwards must not change the bytes sent.
  it "sends large String chunks intact even when the app changes the Strings after handing them over" do
    big = ("a" * 1023 + "\n") * 256 # 256 KiB, over the no-copy threshold
    app = lambda do |_env|
      mine = big.dup
      body = Object.new
      body.define_singleton_method(:each) do |&block|
        block.call(mine)
        mine.replace("z" * mine.bytesize) # in place, after yielding
        block.call(mine)
        mine.clear
      end
      [200, { "content-length" => (big.bytesize * 2).to_s }, body]
    end
    with_worker(app) do |port|
      socket = TCPSocket.new("127.0.0.1", port)
      socket.write("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      sleep 0.5 # a slow reader: the bytes wait in the server while the app mutates
      GC.start
      status, _headers, body = parse_responses(read_all(socket, 20)).first
      expect(status).to eq(200)
      expect(body.bytesize).to eq(big.bytesize * 2)
      expect(body).to eq(big + "z" * big.bytesize)
    ensure
      socket&.close
    end
  end

  it "sends 205 Reset Content with no content, whatever length the app declared" do
    counter = []
    app = lambda do |env|
      next [200, {}, ["next"]] unless env["PATH_INFO"] == "/reset"

      [205, { "content-length" => "9" }, TestApps::CountingBody.new(["forbidden"], counter)]
    end
    with_worker(app) do |port|
      raw = raw_exchange(port, "GET /reset HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      expect(raw).not_to include("forbidden")
      (status, headers, body), (next_status, _, next_body) = parse_responses(raw)
      expect([status, headers["content-length"], body]).to eq([205, ["0"], ""])
      expect([next_status, next_body]).to eq([200, "next"])
    end
    expect(counter).to eq(%i[closed])
  end

  describe "responses that break the Rack SPEC become a 500 and the worker keeps serving" do
    {
      "a String status" => ->(_) { ["200", {}, ["x"]] },
      "headers that are not enumerable" => ->(_) { [200, 42, ["x"]] },
      "a non-String chunk" => ->(_) { [200, {}, [:symbol]] },
      "a body without #each" => ->(_) { [200, {}, Object.new] },
      "a response that is not a triple" => ->(_) { [200, {}] },
      "a header name with a space" => ->(_) { [200, { "bad name" => "x" }, ["x"]] }
    }.each do |problem, app|
      it "for #{problem}" do
        with_worker(app) do |port|
          2.times do
            status, _headers, body = parse_responses(raw_exchange(port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).first
            expect([status, body]).to eq([500, "Internal Server Error\n"])
          end
        end
      end
    end
  end

  it "answers 500 to a header injection attempt and nothing injected reaches the wire" do
    ["x\r\nSet-Cookie: evil=1", "x\rSet-Cookie: evil=1", "x\0y"].each do |value|
      with_worker(->(_) { [200, { "x-injected" => value }, ["body"]] }) do |port|
        raw = raw_exchange(port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        expect(raw).to start_with("HTTP/1.1 500")
        expect(raw).not_to include("evil")
        expect(raw).not_to include("x-injected")
      end
    end
    with_worker(->(_) { [200, { "x-ok\r\nSet-Cookie" => "evil=1" }, ["body"]] }) do |port|
      raw = raw_exchange(port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      expect(raw).to start_with("HTTP/1.1 500")
      expect(raw).not_to include("evil")
    end
  end

  describe "body#close is called exactly once" do
    # Serves one request with a body built by `body_factory` (given the close
    # counter); yields the raw response; returns the counter.
    def closes_for(body_factory, status: 200)
      counter = []
      with_worker(->(_) { [status, {}, body_factory.call(counter)] }) do |port|
        raw = raw_exchange(port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        yield raw if block_given?
      end
      counter
    end

    it "after a normal streamed response" do
      expect(closes_for(->(c) { TestApps::CountingBody.new(%w[a b], c) })).to eq([:closed])
    end

    it "when #each raises mid-stream" do
      expect(closes_for(->(c) { TestApps::CountingBody.new(%w[a b], c, raise_in_each: true) })).to eq([:closed])
    end

    it "when #each raises before its first chunk (answered 500)" do
      counter = closes_for(->(c) { TestApps::CountingBody.new([], c, raise_in_each: true) }) do |raw|
        expect(raw).to start_with("HTTP/1.1 500")
      end
      expect(counter).to eq([:closed])
    end

    it "when the status is invalid (answered 500)" do
      counter = closes_for(->(c) { TestApps::CountingBody.new(["a"], c) }, status: "oops") do |raw|
        expect(raw).to start_with("HTTP/1.1 500")
      end
      expect(counter).to eq([:closed])
    end

    it "for a body that also responds to #to_ary" do
      with_to_ary = Class.new(TestApps::CountingBody) { def to_ary = ["array"] }
      counter = closes_for(->(c) { with_to_ary.new(["each"], c) }) do |raw|
        expect(raw).to end_with("array")
      end
      expect(counter).to eq([:closed])
    end

    it "when the client has gone away during a long stream" do
      counter = []
      closed = Queue.new
      endless = Class.new do
        define_method(:each) { |&chunk| loop { chunk.call("x" * 65_536) } }
        define_method(:close) { counter << :closed; closed << true }
      end.new
      app = ->(env) { env["PATH_INFO"] == "/endless" ? [200, {}, endless] : [200, {}, ["ok"]] }
      with_worker(app) do |port|
        socket = TCPSocket.new("127.0.0.1", port)
        socket.write("GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
        socket.readpartial(1024)
        socket.close
        Timeout.timeout(10) { closed.pop }
        expect(http_get(port).body).to eq("ok") # still serving
      end
      expect(counter).to eq([:closed])
    end
  end
end
