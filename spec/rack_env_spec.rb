# frozen_string_literal: true

require "spec_helper"

RSpec.describe "the Rack env" do
  def env_for(raw)
    with_worker(TestApps.env_dump) do |port|
      responses = parse_responses(raw_exchange(port, raw))
      expect(responses.size).to eq(1)
      status, _headers, body = responses.first
      expect(status).to eq(200)
      JSON.parse(body)
    end
  end

  it "has the CGI and rack keys for a GET" do
    env = env_for("GET /path/to%20x?a=1&b=2 HTTP/1.1\r\nHost: example.test:8080\r\nUser-Agent: spec\r\n" \
                  "X-Forwarded-For: 10.0.0.1\r\nConnection: close\r\n\r\n")
    expect(env).to include(
      "REQUEST_METHOD" => "GET", "SCRIPT_NAME" => "", "PATH_INFO" => "/path/to%20x",
      "QUERY_STRING" => "a=1&b=2", "REQUEST_URI" => "/path/to%20x?a=1&b=2",
      "SERVER_NAME" => "example.test", "SERVER_PORT" => "8080", "SERVER_PROTOCOL" => "HTTP/1.1",
      "REMOTE_ADDR" => "127.0.0.1", "HTTP_HOST" => "example.test:8080", "HTTP_USER_AGENT" => "spec",
      "HTTP_X_FORWARDED_FOR" => "10.0.0.1", "rack.version" => [1, 3], "rack.url_scheme" => "http",
      "rack.multithread" => true, "rack.multiprocess" => false, "rack.run_once" => false,
      "rack.hijack?" => true, "rack.hijack" => "#<Hyperion::Hijack>", "rack.after_reply" => [],
      "rack.response_finished" => [], "rack.errors" => "#<IO>", "body" => "", "frozen_env" => false
    )
    expect(env.keys).not_to include("CONTENT_LENGTH", "CONTENT_TYPE")
  end

  it "gives a POST its CONTENT_TYPE/CONTENT_LENGTH (never as HTTP_CONTENT_*) and a binary, rewindable rack.input" do
    env = env_for("POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n" \
                  "Content-Length: 10\r\nConnection: close\r\n\r\nname=h\xC3\xA9ll".b)
    expect(env).to include("REQUEST_METHOD" => "POST", "CONTENT_TYPE" => "application/x-www-form-urlencoded",
                           "CONTENT_LENGTH" => "10", "rack.input" => "#<StringIO>",
                           "body" => "name=h\u00e9ll".b.force_encoding("UTF-8"), "body_encoding" => "ASCII-8BIT")
    expect(env["input_rewound_read"]).to eq(env["body"])
    expect(env.keys.grep(/HTTP_CONTENT/)).to be_empty
  end

  it "builds a HEAD env like a GET's" do
    with_worker(TestApps.env_dump) do |port|
      raw = raw_exchange(port, "HEAD /h?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      expect(raw).to start_with("HTTP/1.1 200")
      expect(raw).to end_with("\r\n\r\n") # no body on the wire
    end
    seen = nil
    app = ->(env) { seen = env.slice("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING"); [200, {}, []] }
    with_worker(app) { |port| raw_exchange(port, "HEAD /h?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") }
    expect(seen).to eq("REQUEST_METHOD" => "HEAD", "PATH_INFO" => "/h", "QUERY_STRING" => "x=1")
  end

  it "keeps IPv6 brackets in SERVER_NAME and uses the scheme's port when Host has none" do
    expect(env_for("GET / HTTP/1.1\r\nHost: [::1]:9443\r\nConnection: close\r\n\r\n"))
      .to include("SERVER_NAME" => "[::1]", "SERVER_PORT" => "9443")
    expect(env_for("GET / HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"))
      .to include("SERVER_NAME" => "example.test", "SERVER_PORT" => "80")
  end

  it "takes SERVER_NAME, SERVER_PORT and HTTP_HOST from an absolute-form target, not from Host (RFC 9112 3.2.2)" do
    expect(env_for("GET http://a.example/x?q=1 HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n"))
      .to include("SERVER_NAME" => "a.example", "SERVER_PORT" => "80", "HTTP_HOST" => "a.example",
                  "PATH_INFO" => "/x", "QUERY_STRING" => "q=1", "REQUEST_URI" => "/x?q=1")
    expect(env_for("GET http://[::1]:8080/ HTTP/1.1\r\nHost: other.example:9000\r\nConnection: close\r\n\r\n"))
      .to include("SERVER_NAME" => "[::1]", "SERVER_PORT" => "8080", "HTTP_HOST" => "[::1]:8080")
  end

  it "falls back to the bound address without a Host header" do
    with_worker(TestApps.env_dump) do |port|
      _status, _headers, body = parse_responses(raw_exchange(port, "GET / HTTP/1.0\r\n\r\n")).first
      expect(JSON.parse(body)).to include("SERVER_NAME" => "127.0.0.1", "SERVER_PORT" => port.to_s,
                                          "SERVER_PROTOCOL" => "HTTP/1.0")
    end
  end

  it "drops underscore headers so they cannot pose as dashed ones" do
    env = env_for("GET / HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: 6.6.6.6\r\nX-Real-Ip: 1.2.3.4\r\n" \
                  "Connection: close\r\n\r\n")
    expect(env).not_to have_key("HTTP_X_FORWARDED_FOR")
    expect(env["HTTP_X_REAL_IP"]).to eq("1.2.3.4")
  end

  it "joins repeated headers with a comma, and cookies with a semicolon" do
    env = env_for("GET / HTTP/1.1\r\nHost: x\r\nAccept: text/html\r\nAccept: text/plain\r\n" \
                  "Cookie: a=1\r\nCookie: b=2\r\nConnection: close\r\n\r\n")
    expect(env).to include("HTTP_ACCEPT" => "text/html, text/plain", "HTTP_COOKIE" => "a=1; b=2")
  end

  it "gives a chunked body its decoded CONTENT_LENGTH and no transfer coding" do
    env = env_for("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" \
                  "4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n")
    expect(env).to include("body" => "Wikipedia", "CONTENT_LENGTH" => "9")
    expect(env).not_to have_key("HTTP_TRANSFER_ENCODING")
  end

  it "spills a large body to a rewindable binary Tempfile with gets/each/read(len, buf)" do
    payload = ("0123456789" * 210_000).b # 2.1 MB, over the 1 MiB memory threshold
    payload[0, 6] = "line1\n"
    observed = nil
    app = lambda do |env|
      input = env["rack.input"]
      first_line = input.gets
      buffer = +""
      input.read(4, buffer)
      chunks = 0
      input.each { chunks += 1 }
      input.rewind
      observed = { class: input.class, line: first_line, buffer: buffer, chunks_positive: chunks.positive?,
                   whole: input.read, binary: input.external_encoding == Encoding::BINARY }
      [200, {}, ["ok"]]
    end
    with_worker(app) do |port|
      expect(http_post(port, "/", payload, "Content-Type" => "application/octet-stream").body).to eq("ok")
    end
    expect(observed).to include(class: File, line: "line1\n", buffer: "6789", chunks_positive: true, binary: true)
    expect(observed[:whole].bytesize).to eq(payload.bytesize)
    expect(observed[:whole]).to eq(payload)
  end

  # The spilled body's descriptor is handed to Ruby without running Ruby
  # code, so nothing can raise in between and leak it (File.for_fd could).
  it "leaks no descriptor when spilled bodies reach the app, even if File.for_fd would raise" do
    allow(File).to receive(:for_fd).and_raise(IOError, "simulated failure while wrapping the body")
    payload = "x".b * 1_200_000
    sizes = []
    app = ->(env) { sizes << env["rack.input"].size; [200, {}, ["ok"]] }
    with_worker(app) do |port|
      http_post(port, "/", payload) # warm-up: lazily opened descriptors
      before = Dir.children("/proc/self/fd").size
      codes = Array.new(20) { http_post(port, "/", payload).code }
      GC.start # a leaked File would be closed here; a leaked bare descriptor would not
      expect(codes.uniq).to eq(["200"])
      expect(Dir.children("/proc/self/fd").size).to be <= before + 2
    end
    expect(sizes.uniq).to eq([payload.bytesize])
  end

  it "gives every request a fresh env Hash" do
    envs = []
    app = ->(env) { envs << env; env["app.mark"] = envs.size; [200, {}, [""]] }
    with_worker(app) do |port|
      3.times { http_get(port) }
    end
    expect(envs.map(&:object_id).uniq.size).to eq(3)
    expect(envs.map { |e| e["app.mark"] }).to eq([1, 2, 3])
  end
end
