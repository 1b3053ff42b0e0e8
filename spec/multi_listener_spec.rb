# frozen_string_literal: true

require "spec_helper"

# One Hyperion::Worker serving several listening sockets at once (Puma's
# several `bind`s): `listener:` as an Array, `tls:` as one Hash for all or an
# Array with one entry (Hash or nil) per listener.
RSpec.describe "Hyperion::Worker with several listeners" do
  let(:pki) { TestPKI.new }
  let(:required) { { host: "127.0.0.1", port: 0, app: app, read_timeout: spec_read_timeout } }
  # Reports what the env says about the listener a request came in on.
  let(:app) do
    lambda do |env|
      [200, { "content-type" => "text/plain" },
       [[*env.values_at("rack.url_scheme", "SERVER_NAME", "SERVER_PORT"), env.fetch("HTTPS", "off")].join(" ")]]
    end
  end

  def tcp_server = TCPServer.new("127.0.0.1", 0)

  def port_of(server) = server.local_address.ip_port

  # Runs a Worker on `listeners` in a thread and yields it; stops it
  # afterwards and re-raises whatever `run` raised.
  def with_listeners(listeners, tls: nil, **options)
    worker = Hyperion::Worker.new(**required, thread_count: 2, listener: listeners, tls: tls, **options)
    runner = Thread.new { worker.run }
    runner.report_on_exception = false
    yield worker
  ensure
    worker&.stop
    runner&.join(10) || raise("worker did not stop within 10 s")
    (listeners.is_a?(Array) ? listeners : [listeners]).each { |l| l.close unless l.closed? }
    runner&.value
  end

  # An HTTP/1.0 request without Host: SERVER_NAME/SERVER_PORT come from the
  # listener itself (ServerInfo), not from the request.
  def hostless_body(port)
    response = raw_exchange(port, "GET / HTTP/1.0\r\n\r\n")
    expect(response).to start_with("HTTP/1.0 200").or start_with("HTTP/1.1 200")
    response.split("\r\n\r\n", 2).last
  end

  def https_get(port, ca: nil)
    http = Net::HTTP.new("127.0.0.1", port)
    http.use_ssl = true
    if ca
      http.ca_file = ca
      http.verify_mode = OpenSSL::SSL::VERIFY_PEER
    else
      http.verify_mode = OpenSSL::SSL::VERIFY_NONE
    end
    http.open_timeout = 5
    http.read_timeout = 5
    http.start { |h| h.get("/") }
  end

  def refused?(port)
    TCPSocket.new("127.0.0.1", port).close
    false
  rescue Errno::ECONNREFUSED
    true
  end

  it "answers on every TCPServer of the Array, each with its own SERVER_PORT, and stops them all" do
    a = tcp_server
    b = tcp_server
    ports = [port_of(a), port_of(b)]
    with_listeners([a, b]) do
      ports.each do |port|
        expect(http_get(port).body).to eq("http 127.0.0.1 #{port} off")
        expect(hostless_body(port)).to eq("http 127.0.0.1 #{port} off")
      end
    end
    # close_adopted_listener closes every adopted Ruby socket at stop, and
    # the worker's own duplicates are gone too.
    expect([a, b].map(&:closed?)).to eq([true, true])
    ports.each { |port| expect(refused?(port)).to be(true), "port #{port} still accepts" }
  end

  it "serves plain http on one listener and https on another with tls: [nil, Hash]" do
    plain = tcp_server
    secure = tcp_server
    plain_port = port_of(plain)
    secure_port = port_of(secure)
    tls = [nil, { cert: pki.path("chain.pem"), key: pki.path("server.key") }]
    with_listeners([plain, secure], tls: tls) do
      expect(http_get(plain_port).body).to eq("http 127.0.0.1 #{plain_port} off")
      response = https_get(secure_port, ca: pki.path("root.pem"))
      expect(response.body).to eq("https 127.0.0.1 #{secure_port} on")

      # The plain listener does not speak TLS, the TLS one does not speak plain.
      expect { https_get(plain_port) }.to raise_error(OpenSSL::SSL::SSLError)
      expect(raw_exchange(secure_port, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", wait: 2)).not_to include("200")
    end
  end

  it "accepts self_signed: true for one entry of the tls: Array" do
    plain = tcp_server
    secure = tcp_server
    with_listeners([plain, secure], tls: [nil, { self_signed: true }]) do
      expect(http_get(port_of(plain)).body).to start_with("http ")
      expect(https_get(port_of(secure)).body).to eq("https 127.0.0.1 #{port_of(secure)} on")
    end
  end

  it "applies a tls: Hash to every listener of an Array" do
    a = tcp_server
    b = tcp_server
    with_listeners([a, b], tls: { self_signed: true }) do
      [a, b].each do |server|
        expect(https_get(port_of(server)).body).to eq("https 127.0.0.1 #{port_of(server)} on")
      end
    end
  end

  it "speaks HTTP/2 per listener: ALPN h2 on the TLS one, h2c on the plain one" do
    plain = tcp_server
    secure = tcp_server
    plain_port = port_of(plain)
    secure_port = port_of(secure)
    tls = [nil, { cert: pki.path("chain.pem"), key: pki.path("server.key") }]
    with_listeners([plain, secure], tls: tls) do
      out, status = Open3.capture2e("curl", "-s", "--http2-prior-knowledge", "-w", "\n%{http_version}",
                                    "http://127.0.0.1:#{plain_port}/")
      expect(status).to be_success, out
      expect(out).to eq("http 127.0.0.1 #{plain_port} off\n2")
      out, status = Open3.capture2e("curl", "-s", "--http2", "--cacert", pki.path("root.pem"),
                                    "--resolve", "localhost:#{secure_port}:127.0.0.1", "-w", "\n%{http_version}",
                                    "https://localhost:#{secure_port}/")
      expect(status).to be_success, out
      expect(out).to eq("https localhost #{secure_port} on\n2")
    end
  end

  it "serves a TCPServer and a UNIXServer together" do
    path = File.join(Dir.mktmpdir("hyperion"), "s.sock")
    tcp = tcp_server
    unix = UNIXServer.new(path)
    with_listeners([tcp, unix]) do
      expect(http_get(port_of(tcp)).body).to eq("http 127.0.0.1 #{port_of(tcp)} off")
      socket = UNIXSocket.new(path)
      socket.write("GET / HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
      response = read_all(socket, 5)
      socket.close
      expect(response).to start_with("HTTP/1.1 200")
      expect(response).to end_with("http example.test 80 off")
    end
    expect(unix.closed?).to be(true)
    expect { UNIXSocket.new(path) }.to raise_error(Errno::ECONNREFUSED)
  end

  it "serves TLS on a unix-socket listener whose tls: entry is a Hash" do
    path = File.join(Dir.mktmpdir("hyperion"), "s.sock")
    tcp = tcp_server
    unix = UNIXServer.new(path)
    with_listeners([tcp, unix], tls: [nil, { self_signed: true }]) do
      expect(http_get(port_of(tcp)).body).to start_with("http ")
      context = OpenSSL::SSL::SSLContext.new
      context.verify_mode = OpenSSL::SSL::VERIFY_NONE
      ssl = OpenSSL::SSL::SSLSocket.new(UNIXSocket.new(path), context)
      ssl.sync_close = true
      ssl.connect
      ssl.write("GET / HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
      response = ssl.read
      ssl.close
      expect(response).to start_with("HTTP/1.1 200")
      expect(response).to end_with("https example.test 443 on")
    end
  end

  it "still accepts one socket, not in an Array, with a tls: Hash" do
    server = tcp_server
    with_listeners(server, tls: { self_signed: true }) do
      expect(https_get(port_of(server)).body).to eq("https 127.0.0.1 #{port_of(server)} on")
    end
    expect(server.closed?).to be(true)
  end

  it "keeps the adopted sockets alive through GC when only the Worker references them", :gc_stress do
    ports = []
    worker = build_worker_holding_the_only_references(ports)
    GC.start(full_mark: true, immediate_sweep: true)
    GC.compact if GC.respond_to?(:compact)
    runner = Thread.new { worker.run }
    runner.report_on_exception = false
    ports.each do |port|
      body = gc_stress { curl_get("http://127.0.0.1:#{port}/") }
      expect(body).to eq("http 127.0.0.1 #{port} off")
    end
  ensure
    worker&.stop
    runner&.join(10) || raise("worker did not stop within 10 s")
    runner&.value
  end

  # The sockets exist only inside the Array handed to the Worker, so nothing
  # but the Worker's GC marking keeps them (and their descriptors) alive.
  def build_worker_holding_the_only_references(ports)
    listeners = Array.new(2) { tcp_server }
    listeners.each { |l| ports << port_of(l) }
    worker = Hyperion::Worker.new(**required, listener: listeners)
    listeners.clear # the caller's Array changing later does not matter either
    worker
  end

  it "logs one 'worker listening' line per listener" do
    script = <<~RUBY
      require "hyperion"
      require "socket"
      a = TCPServer.new("127.0.0.1", 0)
      b = TCPServer.new("127.0.0.1", 0)
      puts "ports \#{a.local_address.ip_port} \#{b.local_address.ip_port}"
      $stdout.flush
      worker = Hyperion::Worker.new(host: "127.0.0.1", port: 0, app: ->(_) { [200, {}, ["ok"]] }, read_timeout: 5,
                                    listener: [a, b], tls: [{ self_signed: true }, nil])
      runner = Thread.new { worker.run }
      sleep 0.5
      worker.stop
      runner.join
    RUBY
    out, status = run_ruby(script, env: { "HYPERION_LOG" => "info" })
    expect(status).to be_success, out
    first, second = out[/ports (\d+ \d+)/, 1].split.map(&:to_i)
    lines = out.lines.grep(/worker listening/)
    expect(lines.size).to eq(2), out
    expect(lines[0]).to include("url=https://127.0.0.1:#{first}")
    expect(lines[1]).to include("url=http://127.0.0.1:#{second}")
    expect(out.scan("self-signed development certificate").size).to eq(1), out
  end

  describe "validation" do
    let(:sockets) { [tcp_server, tcp_server] }

    after { sockets.each { |s| s.close unless s.closed? } }

    def new_worker(**options) = Hyperion::Worker.new(**required, **options)

    it "raises ArgumentError when tls: and listener: Arrays differ in length" do
      expect { new_worker(listener: sockets, tls: [nil]) }
        .to raise_error(ArgumentError, /\Atls: the Array has 1 entries but listener: has 2 sockets/)
      expect { new_worker(listener: sockets, tls: [nil, nil, nil]) }
        .to raise_error(ArgumentError, /\Atls: the Array has 3 entries but listener: has 2 sockets/)
    end

    it "raises ArgumentError for an empty tls: Array" do
      expect { new_worker(listener: sockets, tls: []) }
        .to raise_error(ArgumentError, /\Atls: the Array has 0 entries/)
    end

    it "raises ArgumentError for an empty listener: Array" do
      expect { new_worker(listener: []) }.to raise_error(ArgumentError, /\Alistener: the Array is empty/)
    end

    it "raises ArgumentError for an Array tls: without an Array listener:" do
      expect { new_worker(tls: [nil]) }
        .to raise_error(ArgumentError, /\Atls: an Array \(one entry per listener\) needs listener: to be an Array/)
      expect { new_worker(listener: sockets.first, tls: [{ self_signed: true }]) }
        .to raise_error(ArgumentError, /\Atls: an Array/)
    end

    it "names the bad element of a listener: or tls: Array" do
      expect { new_worker(listener: [sockets.first, "fd"]) }
        .to raise_error(TypeError, /\Alistener: element 1: expected a TCPServer or UNIXServer, got String/)
      expect { new_worker(listener: [sockets.first, nil]) }
        .to raise_error(TypeError, /\Alistener: element 1: expected a TCPServer or UNIXServer, got NilClass/)
      expect { new_worker(listener: sockets, tls: [nil, { cert: "c.pem" }]) }
        .to raise_error(ArgumentError, /\Atls: element 1: :key is missing/)
      expect { new_worker(listener: sockets, tls: [nil, "yes"]) }
        .to raise_error(TypeError, /\Atls: element 1: expected a Hash, got String/)
    end

    it "checks the tls: files of every listener when it runs" do
      worker = new_worker(listener: sockets, tls: [nil, { cert: "/nonexistent/c.pem", key: "/nonexistent/k.pem" }])
      expect { worker.run }.to raise_error(Hyperion::TLSError, %r{cannot read the TLS certificate /nonexistent/c.pem})
    end

    it "refuses an Array holding a socket that is not listening, before serving any" do
      socket = Socket.new(:INET, :STREAM)
      worker = new_worker(listener: [sockets.first, socket])
      expect { worker.run }.to raise_error(Hyperion::Error, /not listening/)
    ensure
      socket&.close
    end
  end
end
