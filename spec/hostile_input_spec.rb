# frozen_string_literal: true

require "spec_helper"

# Black-box checks of how the server answers malformed and smuggling-style
# HTTP/1.1 requests (RFC 9110 / RFC 9112). For every refused request:
#   1. the status line is the expected one,
#   2. the response carries `connection: close`,
#   3. the app is never called,
#   4. nothing else is answered on that connection (no smuggled request), and
#   5. the server still answers a normal GET on a new connection.
RSpec.describe "hostile HTTP/1.1 input" do
  # A well-formed request. It is pipelined after every refused request and
  # embedded in bodies and trailers: the app must never see /smuggled.
  smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
  # `smuggled` padded (with an X-Pad header) to exactly `size` bytes.
  padded_smuggled = lambda do |size|
    head = "GET /smuggled HTTP/1.1\r\nHost: x\r\nX-Pad: "
    "#{head}#{'a' * (size - head.bytesize - 4)}\r\n\r\n"
  end
  chunked_post = "POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
  tls_client_hello = "\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03".b + Random.new(1).bytes(32)
  closed = nil # an expected "status" meaning: closed without writing a response

  # [name, request bytes (the pipelined `smuggled` GET is appended), acceptable statuses]
  refused = [
    ["two differing Content-Length headers",
     "POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: #{smuggled.bytesize}\r\n\r\n#{smuggled}", [400]],
    ['Content-Length "+5"', "POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello", [400]],
    ['Content-Length "5.0"', "POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: 5.0\r\n\r\nhello", [400]],
    ['Content-Length "0x5"', "POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\nhello", [400]],
    ["an empty Content-Length", "POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\nhello", [400]],
    ['Transfer-Encoding "chunked, gzip" (chunked not last)',
     "POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", [400]],
    ['Transfer-Encoding "gzip, chunked" (a coding Hyperion does not decode)',
     "POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", [501]],
    # chunked is not the final coding, so the body cannot be framed: RFC 9112
    # 6.3 says 400 and close (a MUST, over 6.1's "SHOULD 501" for unknown codings).
    ['an unknown Transfer-Encoding "foo"', "POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: foo\r\n\r\nhello", [400]],
    ['Transfer-Encoding "chunked, chunked" (chunked applied twice, RFC 9112 6.1)',
     "POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", [400]],
    ["two Transfer-Encoding: chunked lines",
     "POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", [400]],
    ['chunk size "+5"', "#{chunked_post}+5\r\nhello\r\n0\r\n\r\n", [400]],
    ['chunk size "0x5"', "#{chunked_post}0x5\r\nhello\r\n0\r\n\r\n", [400]],
    ['chunk size "5zz"', "#{chunked_post}5zz\r\nhello\r\n0\r\n\r\n", [400]],
    ["chunk data longer than its size", "#{chunked_post}5\r\nhello world\r\n0\r\n\r\n", [400]],
    ["chunk data shorter than its size", "#{chunked_post}a\r\nhello\r\n0\r\n\r\n", [400]],
    ["a 20 KB chunk extension", "#{chunked_post}5;ext=#{'e' * 20_480}\r\nhello\r\n0\r\n\r\n", [400]],
    ["a trailer section holding a request line", "#{chunked_post}5\r\nhello\r\n0\r\n#{smuggled}", [400]],
    ["bare CR line endings in the head", "GET /cr HTTP/1.1\rHost: x\r\r", [400]],
    ["an obs-fold continuation line", "GET /fold HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", [400]],
    ["whitespace between a header name and the colon", "GET /ws HTTP/1.1\r\nHost : x\r\n\r\n", [400]],
    ["a NUL byte in the request target", "GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n", [400]],
    ["a control byte (0x01) in the request target", "GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n", [400]],
    ["a DEL byte (0x7f) in the request target", "GET /a\x7fb HTTP/1.1\r\nHost: x\r\n\r\n", [400]],
    ['an invalid method token "G(T"', "G(T / HTTP/1.1\r\nHost: x\r\n\r\n", [400]],
    ["version HTTP/1.2", "GET /v HTTP/1.2\r\nHost: x\r\n\r\n", [400, 505]],
    ["version HTTP/2.0 in an HTTP/1 request line", "GET /v HTTP/2.0\r\nHost: x\r\n\r\n", [400, 505]],
    ["version HTTX/1.1", "GET /v HTTX/1.1\r\nHost: x\r\n\r\n", [400, 505]],
    ["TLS handshake bytes on the plain port", tls_client_hello, [400, closed]],
    ["HTTP/1.1 without Host", "GET /nohost HTTP/1.1\r\n\r\n", [400]],
    ["HTTP/1.1 with two Host headers", "GET /twohost HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", [400]],
    ["an absolute-form target with userinfo (RFC 9110 4.2.4)",
     "GET http://user@a.example/userinfo HTTP/1.1\r\nHost: a.example\r\n\r\n", [400]],
    ['Expect "something-else"',
     "POST /expect HTTP/1.1\r\nHost: x\r\nExpect: something-else\r\nContent-Length: 5\r\n\r\nhello", [417]]
  ]

  # Host values that are not `uri-host [ ":" port ]` (RFC 9110 7.2, RFC 3986 3.2.2): 400 (RFC 9112 3.2).
  [
    "a b", "a/b", "a@b", "a?b", "a#b", "a\\b", "x:abc", "x:99999", "x:1:2", "[::1", "::1", "[::1]x", "[not-ipv6]",
    ":80", "%zz", "a%4", "h\xC3\xA9.example".b, "a\tb"
  ].each do |host|
    refused << ["the malformed Host #{host.inspect}", "GET /badhost HTTP/1.1\r\nHost: #{host}\r\n\r\n", [400]]
  end

  # [name, Worker keywords, request bytes (sent as they are), expected status]
  over_limit = [
    ["a 2 KB request target over max_uri_bytes: 1024", { max_uri_bytes: 1024 },
     "GET /#{'u' * 2048} HTTP/1.1\r\nHost: x\r\n\r\n#{smuggled}", 414],
    ["an 8 KB header block over max_header_bytes: 4096", { max_header_bytes: 4096 },
     "GET /big-head HTTP/1.1\r\nHost: x\r\n#{(1..8).map { |i| "X-Pad-#{i}: #{'h' * 1024}\r\n" }.join}\r\n#{smuggled}", 431],
    ["a 16 KB header block over max_header_bytes: 8192", { max_header_bytes: 8192 },
     "GET /big-head HTTP/1.1\r\nHost: x\r\n#{(1..16).map { |i| "X-Pad-#{i}: #{'h' * 1024}\r\n" }.join}\r\n#{smuggled}", 431],
    ["30 header lines over max_headers: 20", { max_headers: 20 },
     "GET /many HTTP/1.1\r\nHost: x\r\n#{(1..30).map { |i| "X-H-#{i}: v\r\n" }.join}\r\n#{smuggled}", 431],
    ["Content-Length: 5000 over max_body_bytes: 1000 (the body is a padded request)", { max_body_bytes: 1000 },
     "POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n#{padded_smuggled.call(5000)}", 413],
    ["a chunked body over max_body_bytes: 1000, mid-stream (no last chunk is sent)", { max_body_bytes: 1000 },
     "#{chunked_post}#{"1f4\r\n#{padded_smuggled.call(500)}\r\n" * 3}", 413],
    ["Expect: 100-continue with Content-Length over max_body_bytes: 1000 (no 100 Continue)", { max_body_bytes: 1000 },
     "POST /big HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n", 413]
  ]

  # Both framings at once (RFC 9112 6.3): the server may refuse (400) or let
  # Transfer-Encoding win, but must then close, so that nothing is smuggled.
  # [name, request bytes, the body the app sees if Transfer-Encoding wins]
  both_framings = [
    ["Content-Length shorter than the chunked body (CL.TE)",
     "POST /clte HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n" \
     "#{smuggled.bytesize.to_s(16)}\r\n#{smuggled}\r\n0\r\n\r\n", smuggled],
    ["Content-Length longer than the chunked body (TE.CL)",
     "POST /clte HTTP/1.1\r\nHost: x\r\nContent-Length: #{5 + smuggled.bytesize}\r\nTransfer-Encoding: chunked\r\n\r\n" \
     "0\r\n\r\n#{smuggled}", ""]
  ]

  let(:calls) { Thread::Queue.new }
  let(:app) do
    calls = self.calls
    lambda do |env|
      calls << { path: env["PATH_INFO"], body: env["rack.input"]&.read, http_keys: env.keys.grep(/\AHTTP_/) }
      [200, { "content-type" => "text/plain" }, ["ok"]]
    end
  end

  def recorded_calls
    Array.new(calls.size) { calls.pop }
  end

  def status_of(raw)
    raw.b[%r{\AHTTP/\d\.\d (\d{3})}, 1]&.to_i
  end

  def status_line_count(raw)
    raw.b.scan(%r{HTTP/\d\.\d \d{3}}).size
  end

  def connection_close?(raw)
    head_lines = raw.b.split("\r\n\r\n", 2).first.to_s.split("\r\n").drop(1)
    head_lines.any? do |line|
      name, value = line.split(":", 2)
      name.casecmp?("connection") && value.to_s.split(",").any? { |token| token.strip.casecmp?("close") }
    end
  end

  def shown(raw)
    raw.empty? ? "nothing (closed or silent for 2 s)" : raw.b[0, 300].inspect
  end

  # Checks 1-4 for `raw`, the server's whole answer to a hostile request.
  def expect_refused(raw, statuses, seen)
    status = status_of(raw)
    wanted = statuses.map { |s| s || "closed without a response" }.join(" or ")
    expect(statuses).to include(status), "expected #{wanted}, the server wrote #{shown(raw)}"
    expect(connection_close?(raw)).to be(true), "expected connection: close, the server wrote #{shown(raw)}" unless raw.empty?
    expect(seen.map { |c| c[:path] }).to be_empty, "the app was called for #{seen.map { |c| c[:path] }}"
    expect(status_line_count(raw)).to be <= 1, "more than one response on the connection: #{shown(raw)}"
  end

  # Check 5, plus: no late call (e.g. /smuggled) reached the app meanwhile.
  def expect_still_serving(port)
    raw = raw_exchange(port, "GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", wait: 2)
    expect(status_of(raw)).to eq(200), "a normal GET afterwards got #{shown(raw)}"
    expect(recorded_calls.map { |c| c[:path] }).to eq(["/after"])
  end

  def pending_unless_worker_accepts(options)
    Hyperion::Worker.new(host: "127.0.0.1", port: 0, app: app, read_timeout: 5, **options)
  rescue ArgumentError => e
    raise unless e.message.start_with?("unknown keyword")

    pending "limits keywords not landed yet"
    raise
  end

  refused.each do |name, bytes, statuses|
    it "refuses #{name} (#{statuses.map { |s| s || 'closed' }.join(' or ')})" do
      with_worker(app) do |port|
        aggregate_failures do
          raw = raw_exchange(port, bytes + smuggled, wait: 2)
          expect_refused(raw, statuses, recorded_calls)
          expect_still_serving(port)
        end
      end
    end
  end

  over_limit.each do |name, options, bytes, status|
    it "answers #{status} to #{name}" do
      pending_unless_worker_accepts(options)
      with_worker(app, **options) do |port|
        aggregate_failures do
          raw = raw_exchange(port, bytes, wait: 2)
          expect_refused(raw, [status], recorded_calls)
          expect(raw).not_to include("100 Continue")
          expect_still_serving(port)
        end
      end
    end
  end

  both_framings.each do |name, bytes, te_body|
    it "never smuggles a request through Content-Length with Transfer-Encoding: #{name}" do
      with_worker(app) do |port|
        aggregate_failures do
          raw = raw_exchange(port, bytes, wait: 2)
          seen = recorded_calls
          if status_of(raw) == 200
            # Transfer-Encoding won: one call, with the chunked body, then close.
            expect(seen.map { |c| [c[:path], c[:body]] }).to eq([["/clte", te_body]])
            expect(connection_close?(raw)).to be(true), "expected connection: close, the server wrote #{shown(raw)}"
            expect(status_line_count(raw)).to eq(1), "more than one response on the connection: #{shown(raw)}"
          else
            expect_refused(raw, [400], seen)
          end
          expect_still_serving(port)
        end
      end
    end
  end

  it "accepts every well-formed Host, and an empty one (RFC 9112 3.2: a target without authority)" do
    hosts = ["", "x", "x:", "x:0", "x:65535", "127.0.0.1:8080", "[::1]:9292", "[::ffff:1.2.3.4]", "[v7.fe:x]",
             "a-b_c.~!$&'()*+,;=%41.example", "xn--bcher-kva.example"]
    with_worker(app) do |port|
      hosts.each do |host|
        raw = raw_exchange(port, "GET /goodhost HTTP/1.1\r\nHost: #{host}\r\nConnection: close\r\n\r\n", wait: 2)
        expect(status_of(raw)).to eq(200), "Host #{host.inspect}: the server wrote #{shown(raw)}"
      end
    end
    expect(recorded_calls.map { |c| c[:path] }).to eq(["/goodhost"] * hosts.size)
  end

  # RFC 9112 2.2 lets a recipient accept a bare LF as a line terminator, and
  # hyper does. That is safe as long as the head is read the same way
  # everywhere: one request, with its headers as headers (not as part of the
  # request line), and the next request only where the head really ended.
  it "reads bare LF line endings as line endings, consistently" do
    seen = Queue.new
    app = ->(env) { seen << env.values_at("PATH_INFO", "HTTP_HOST", "HTTP_X_A"); [200, {}, ["ok"]] }
    with_worker(app) do |port|
      raw = raw_exchange(port, "GET /lf HTTP/1.1\nHost: x\nX-A: b\n\nGET /second HTTP/1.1\r\nHost: y\r\nConnection: close\r\n\r\n",
                         wait: 2)
      expect(raw.scan(%r{HTTP/1\.1 (\d{3})}).flatten).to eq(%w[200 200])
    end
    expect(Array.new(seen.size) { seen.pop }).to eq([["/lf", "x", "b"], ["/second", "y", nil]])
  end

  it "does not put an underscore header (X_Forwarded_For) in the env as HTTP_X_FORWARDED_FOR" do
    with_worker(app) do |port|
      raw = raw_exchange(port, "GET /underscore HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: 1.2.3.4\r\nConnection: close\r\n\r\n",
                         wait: 2)
      expect(status_of(raw)).to eq(200), "the server wrote #{shown(raw)}"
      seen = recorded_calls
      expect(seen.map { |c| c[:path] }).to eq(["/underscore"])
      expect(seen.first[:http_keys]).not_to include("HTTP_X_FORWARDED_FOR")
    end
  end
end
