# frozen_string_literal: true

require "spec_helper"
require "openssl"

# REMOTE_ADDR behind a proxy: the PROXY protocol (v1 and v2) before TLS and
# HTTP, and set_remote_address's header, fixed and socket modes. These specs
# play the proxy with raw bytes; spec/behind_proxies_spec.rb puts real nginx
# and HAProxy in front.
RSpec.describe "PROXY protocol and set_remote_address" do
  include ProxyHeaders

  let(:app) do
    ->(env) { [200, {}, [env.values_at("REMOTE_ADDR", "SERVER_PROTOCOL", "rack.url_scheme").join(" ")]] }
  end
  let(:request) { "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" }

  # Writes `bytes` from `from` (a local address), then reads until the
  # server closes the connection: what it wrote, or :still_open when it did
  # not close within `wait` seconds.
  def exchange(port, bytes, from: "127.0.0.1", wait: 30)
    socket = Socket.tcp("127.0.0.1", port, from)
    socket.write(bytes)
    out = +""
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + wait
    loop do
      remaining = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
      return :still_open if remaining <= 0 || !socket.wait_readable(remaining)

      chunk = socket.read_nonblock(65_536, exception: false)
      return out if chunk.nil?

      out << chunk unless chunk == :wait_readable
    end
  rescue Errno::ECONNRESET, Errno::EPIPE
    out
  ensure
    socket&.close
  end

  def body_of(response) = response.split("\r\n\r\n", 2).last

  describe "proxy_protocol: :v1" do
    it "takes REMOTE_ADDR from the header's source (TCP4 and TCP6); UNKNOWN keeps the socket's" do
      with_worker(app, proxy_protocol: :v1) do |port|
        expect(body_of(exchange(port, proxy_v1("203.0.113.7", "10.0.0.1") + request)))
          .to eq("203.0.113.7 HTTP/1.1 http")
        expect(body_of(exchange(port, proxy_v1("2001:db8::7", "2001:db8::1") + request)))
          .to eq("2001:db8::7 HTTP/1.1 http")
        expect(body_of(exchange(port, "PROXY UNKNOWN\r\n#{request}", from: "127.0.0.2")))
          .to eq("127.0.0.2 HTTP/1.1 http")
      end
    end

    it "keeps the header's client for every request of a keep-alive connection, header sent once" do
      with_worker(app, proxy_protocol: :v1) do |port|
        keep_alive = "GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        responses = parse_responses(exchange(port, proxy_v1("198.51.100.1") + (keep_alive * 2) + request))
        expect(responses.map(&:last)).to eq(["198.51.100.1 HTTP/1.1 http"] * 3)
      end
    end

    it "refuses (closes without a byte) a connection without a valid v1 header, and keeps serving" do
      with_worker(app, proxy_protocol: :v1, read_timeout: 120) do |port|
        too_long = "PROXY UNKNOWN #{'x' * 92}\r\n" # 108 bytes
        longest = "PROXY UNKNOWN #{'x' * 91}\r\n" # 107 bytes: allowed
        expect(longest.bytesize).to eq(107)
        [request, proxy_v2("203.0.113.7"), too_long, "PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n#{request}",
         "PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n#{request}", "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n#{request}",
         "proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n#{request}"].each do |bytes|
          expect(exchange(port, bytes)).to eq(""), bytes.inspect
        end
        expect(body_of(exchange(port, longest + request, from: "127.0.0.2"))).to eq("127.0.0.2 HTTP/1.1 http")
      end
    end

    it "waits for the header at most read_timeout, then closes without a 408" do
      with_worker(app, proxy_protocol: :v1, read_timeout: 1) do |port|
        expect(exchange(port, "PROXY TCP4 1.2")).to eq("")
        expect(exchange(port, "")).to eq("")
      end
      # Without the PROXY protocol a silent connection gets its 408.
      with_worker(app, read_timeout: 1) { |port| expect(exchange(port, "")).to start_with("HTTP/1.1 408") }
    end

    it "reads the header before the TLS handshake, then serves https (HTTP/1.1 and HTTP/2 over ALPN)" do
      with_worker(app, proxy_protocol: :v1, tls: { self_signed: true }) do |port|
        socket = TCPSocket.new("127.0.0.1", port)
        socket.write(proxy_v1("192.0.2.44"))
        context = OpenSSL::SSL::SSLContext.new
        context.verify_mode = OpenSSL::SSL::VERIFY_NONE
        tls = OpenSSL::SSL::SSLSocket.new(socket, context)
        tls.sync_close = true
        tls.connect
        tls.write(request)
        expect(body_of(tls.read)).to eq("192.0.2.44 HTTP/1.1 https")
        tls.close

        # curl's --haproxy-protocol names curl's own address (127.0.0.1).
        out, status = Open3.capture2("curl", "-sk", "--http2", "--haproxy-protocol", "https://127.0.0.1:#{port}/")
        expect([out, status.success?]).to eq(["127.0.0.1 HTTP/2 https", true])
        expect(exchange(port, "\x16\x03\x01\x02\x00")).to eq("") # a ClientHello without the header
      end
    end

    it "reads the header before the HTTP/2 sniff (h2c with prior knowledge)" do
      with_worker(app, proxy_protocol: :v1) do |port|
        out, status = Open3.capture2("curl", "-s", "--http2-prior-knowledge", "--haproxy-protocol",
                                     "http://127.0.0.1:#{port}/")
        expect([out, status.success?]).to eq(["127.0.0.1 HTTP/2 http", true])
        out, = Open3.capture2("curl", "-s", "--http2-prior-knowledge", "http://127.0.0.1:#{port}/")
        expect(out).to eq("")
      end
    end

    it "serves unix-socket listeners too" do
      path = File.join(Dir.mktmpdir("hyperion-proxy"), "s.sock")
      with_worker(app, proxy_protocol: :v1, listener: UNIXServer.new(path)) do
        socket = UNIXSocket.new(path)
        socket.write(proxy_v1("203.0.113.8") + request)
        expect(body_of(read_all(socket, 10))).to eq("203.0.113.8 HTTP/1.1 http")
        socket.close
      end
    end
  end

  describe "proxy_protocol: :v2" do
    it "takes REMOTE_ADDR from the header (IPv4 with a TLV, IPv6); LOCAL keeps the socket's" do
      with_worker(app, proxy_protocol: :v2) do |port|
        expect(body_of(exchange(port, proxy_v2("203.0.113.9", tlv: [0x02, "example.com"]) + request)))
          .to eq("203.0.113.9 HTTP/1.1 http")
        expect(body_of(exchange(port, proxy_v2("2001:db8::9", "2001:db8::1") + request)))
          .to eq("2001:db8::9 HTTP/1.1 http")
        expect(body_of(exchange(port, proxy_v2("203.0.113.9", local: true) + request, from: "127.0.0.2")))
          .to eq("127.0.0.2 HTTP/1.1 http")
      end
    end

    it "refuses a connection without a valid v2 header, and keeps serving" do
      with_worker(app, proxy_protocol: :v2, read_timeout: 120) do |port|
        wrong_version = proxy_v2("203.0.113.9").tap { |h| h.setbyte(12, 0x11) }
        [request + ("x" * 16), proxy_v1("203.0.113.9") + request, wrong_version + request].each do |bytes|
          expect(exchange(port, bytes)).to eq(""), bytes.inspect
        end
        expect(body_of(exchange(port, proxy_v2("203.0.113.10") + request))).to eq("203.0.113.10 HTTP/1.1 http")
      end
    end
  end

  describe "remote_address:" do
    it "is the socket's peer by default" do
      with_worker(app) do |port|
        expect(body_of(exchange(port, request, from: "127.0.0.2"))).to eq("127.0.0.2 HTTP/1.1 http")
      end
    end

    it "header: takes the header's first address, and 127.0.0.1 when it is missing (as Puma)" do
      with_worker(app, remote_address: { header: "X-Forwarded-For" }) do |port|
        forwarded = ->(value) { "GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: #{value}\r\nConnection: close\r\n\r\n" }
        expect(body_of(exchange(port, forwarded.("203.0.113.7, 10.0.0.1"), from: "127.0.0.2")))
          .to eq("203.0.113.7 HTTP/1.1 http")
        expect(body_of(exchange(port, forwarded.("2001:db8::5")))).to eq("2001:db8::5 HTTP/1.1 http")
        expect(body_of(exchange(port, request, from: "127.0.0.2"))).to eq("127.0.0.1 HTTP/1.1 http")
        # X_Forwarded_For is another header (and dropped from the env).
        spoof = "GET / HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: 6.6.6.6\r\nConnection: close\r\n\r\n"
        expect(body_of(exchange(port, spoof))).to eq("127.0.0.1 HTTP/1.1 http")
      end
    end

    it "header: works over HTTP/2 too" do
      with_worker(app, remote_address: { header: "X-Real-IP" }) do |port|
        out, = Open3.capture2("curl", "-s", "--http2-prior-knowledge", "-H", "X-Real-IP: 198.51.100.23",
                              "http://127.0.0.1:#{port}/")
        expect(out).to eq("198.51.100.23 HTTP/2 http")
      end
    end

    it ":localhost and a String give every request that value" do
      with_worker(app, remote_address: :localhost) do |port|
        expect(body_of(exchange(port, request, from: "127.0.0.2"))).to eq("127.0.0.1 HTTP/1.1 http")
      end
      with_worker(app, remote_address: "10.9.8.7") do |port|
        expect(body_of(exchange(port, request))).to eq("10.9.8.7 HTTP/1.1 http")
      end
    end

    it "{ proxy_protocol: :v2 } is proxy_protocol: :v2" do
      with_worker(app, remote_address: { proxy_protocol: :v2 }, proxy_protocol: "v2") do |port|
        expect(body_of(exchange(port, proxy_v2("203.0.113.11") + request))).to eq("203.0.113.11 HTTP/1.1 http")
      end
    end
  end

  describe "Worker.new" do
    let(:required) { { host: "127.0.0.1", port: 0, app: app, read_timeout: 5 } }

    {
      { proxy_protocol: :v3 } => [ArgumentError, /\Aproxy_protocol: expected :v1 or :v2, got "v3"\z/],
      { proxy_protocol: 1 } => [TypeError, /\Aproxy_protocol: expected :v1 or :v2, got Integer\z/],
      { remote_address: :peer } => [ArgumentError, /\Aremote_address: expected :socket, :localhost, a String/],
      { remote_address: 1 } => [TypeError, /\Aremote_address: expected :socket, .* got Integer\z/],
      { remote_address: "" } => [ArgumentError, /\Aremote_address: the String is empty/],
      { remote_address: { header: 5 } } => [TypeError, /\Aremote_address: header: expected a String, got Integer\z/],
      { remote_address: { header: "X Real IP" } } => [ArgumentError, /\Aremote_address: header: "X Real IP" is not a header name\z/],
      { remote_address: { forwarded: true } } => [ArgumentError, /\Aremote_address: unknown key :forwarded/],
      { remote_address: { header: "X-Real-IP", proxy_protocol: :v1 } } =>
        [ArgumentError, /\Aremote_address: give one of header: or proxy_protocol:, got 2 keys\z/],
      { remote_address: { proxy_protocol: :v9 } } => [ArgumentError, /\Aremote_address: proxy_protocol: expected :v1 or :v2/],
      { remote_address: { header: "X-Real-IP" }, proxy_protocol: :v1 } =>
        [ArgumentError, /\Aproxy_protocol: given together with another remote_address:/]
    }.each do |keywords, (error, message)|
      it "rejects #{keywords.inspect} with #{error}" do
        expect { Hyperion::Worker.new(**required, **keywords) }.to raise_error(error, message)
      end
    end

    it "accepts nil and false as off" do
      expect { Hyperion::Worker.new(**required, proxy_protocol: nil, remote_address: nil) }.not_to raise_error
      expect { Hyperion::Worker.new(**required, proxy_protocol: false, remote_address: :socket) }.not_to raise_error
    end
  end
end
