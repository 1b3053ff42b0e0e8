# frozen_string_literal: true

require "spec_helper"
require "openssl"
require "rack"
require "rack/lint"

# rack.hijack over HTTP/1.1, plain and TLS: full hijack (env["rack.hijack"])
# and partial hijack (a rack.hijack response header). HTTP/2 has neither.
RSpec.describe "rack.hijack" do
  let(:pki) { TestPKI.new }
  let(:tls) { { cert: pki.path("chain.pem"), key: pki.path("server.key") } }

  def tls_socket(port)
    context = OpenSSL::SSL::SSLContext.new
    context.ca_file = pki.path("root.pem")
    context.verify_mode = OpenSSL::SSL::VERIFY_PEER
    socket = OpenSSL::SSL::SSLSocket.new(TCPSocket.new("127.0.0.1", port), context)
    socket.hostname = "localhost"
    socket.sync_close = true
    socket.connect
    socket
  end

  # Reads until the server closes the connection (plain or TLS).
  def read_to_eof(socket)
    out = +""
    Timeout.timeout(20) do
      loop { out << socket.readpartial(65_536) }
    rescue EOFError, Errno::ECONNRESET, OpenSSL::SSL::SSLError
      # closed
    end
    out
  end

  # An app that hijacks, then (on a thread of its own, as WebSocket
  # libraries do) reads `count` bytes from the IO, answers "echo:<bytes>" and
  # closes. `seen` receives facts about the IO; the body it returns counts
  # its closes into `closes`.
  def echo_hijacker(seen, closes, count)
    lambda do |env|
      io = env["rack.hijack"].call
      seen << { class: io.class, hijack_io: io.equal?(env["rack.hijack_io"]), again: io.equal?(env["rack.hijack"].call),
                fileno: io.fileno, remote_port: (io.remote_address.ip_port if io.is_a?(TCPSocket)) }
      Thread.new do
        io.write("echo:#{io.read(count)}")
        io.close
      end
      [200, {}, TestApps::CountingBody.new(["ignored"], closes)]
    end
  end

  it "gives the app the client's own socket, also in rack.hijack_io, and Hyperion writes nothing after" do
    seen = Queue.new
    closes = []
    with_worker(echo_hijacker(seen, closes, 4)) do |port|
      client = TCPSocket.new("127.0.0.1", port)
      client.write("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
      facts = Timeout.timeout(20) { seen.pop }
      # Sent only once the app holds the connection: nothing was read ahead.
      client.write("ping")
      expect(read_to_eof(client)).to eq("echo:ping")
      expect(facts).to include(class: TCPSocket, hijack_io: true, again: true,
                               remote_port: client.local_address.ip_port)
      expect(facts[:fileno]).to be_a(Integer)
      client.close
    end
    expect(closes).to eq([:closed])
  end

  it "delivers bytes pipelined right behind the request to the app first, through a socketpair" do
    seen = Queue.new
    with_worker(echo_hijacker(seen, [], 11)) do |port|
      client = TCPSocket.new("127.0.0.1", port)
      client.write("GET /ws HTTP/1.1\r\nHost: x\r\n\r\nearly bytes")
      expect(read_to_eof(client)).to eq("echo:early bytes")
      expect(seen.pop).to include(class: UNIXSocket, hijack_io: true)
      client.close
    end
  end

  it "gives a TLS connection's app plain, decrypted bytes through a socketpair, early bytes first" do
    seen = Queue.new
    with_worker(echo_hijacker(seen, [], 10), tls: tls) do |port|
      client = tls_socket(port)
      client.write("GET /ws HTTP/1.1\r\nHost: localhost\r\n\r\nearly")
      client.write(" late")
      expect(read_to_eof(client)).to eq("echo:early late")
      expect(seen.pop).to include(class: UNIXSocket)
      client.close
    end
  end

  it "writes the 103 Early Hints the app sent before the hijacked connection's first byte" do
    app = lambda do |env|
      env["rack.early_hints"].call("link" => "</a.css>; rel=preload")
      io = env["rack.hijack"].call
      io.write("raw")
      io.close
      [200, {}, []]
    end
    with_worker(app, early_hints: true) do |port|
      out = raw_exchange(port, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
      expect(out).to eq("HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\nraw")
    end
  end

  it "leaves the connection to the app: the thread is free, no timeout, not in the drain" do
    kept = Queue.new
    app = lambda do |env|
      if env["PATH_INFO"] == "/ws"
        kept << env["rack.hijack"].call
        [200, {}, []]
      else
        [200, {}, ["hello"]]
      end
    end
    client = nil
    io = nil
    with_worker(app, thread_count: 1, idle_timeout: 1, write_timeout: 1) do |port|
      client = TCPSocket.new("127.0.0.1", port)
      client.write("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
      io = Timeout.timeout(20) { kept.pop }
      # The only app thread answers other requests while the app holds the
      # connection.
      expect(http_get(port, "/").body).to eq("hello")
      # Longer than idle_timeout and write_timeout: still open both ways.
      sleep 2.5
      io.write("still here")
      expect(client.readpartial(100)).to eq("still here")
      client.write("and back")
      expect(io.readpartial(100)).to eq("and back")
    end
    # The worker stopped (with_worker waits for its drain) while the
    # hijacked connection stayed open: it is the app's.
    io.write("after the stop")
    expect(client.readpartial(100)).to eq("after the stop")
    io.close
    expect(read_to_eof(client)).to eq("")
    client.close
  end

  it "works through Rack::Lint (rack.hijack_io is set by the call)" do
    inner = lambda do |env|
      io = env["rack.hijack"].call
      io.write("linted")
      io.close
      [200, {}, []]
    end
    with_worker(Rack::Lint.new(inner)) do |port|
      expect(raw_exchange(port, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")).to eq("linted")
    end
  end

  describe "partial hijack (a rack.hijack response header)" do
    def partial_app(closes)
      lambda do |_env|
        hijack = lambda do |io|
          Thread.new do
            io.write("after the head:#{io.read(5)}")
            io.close
          end
        end
        [101, { "upgrade" => "custom", "connection" => "upgrade", "rack.hijack" => hijack },
         TestApps::CountingBody.new(["ignored"], closes)]
      end
    end

    it "writes the status and headers (not rack.hijack), then gives the callable the IO" do
      closes = []
      with_worker(partial_app(closes)) do |port|
        client = TCPSocket.new("127.0.0.1", port)
        client.write("GET / HTTP/1.1\r\nHost: x\r\n\r\nhello")
        out = read_to_eof(client)
        head, rest = out.split("\r\n\r\n", 2)
        lines = head.split("\r\n")
        expect(lines.first).to eq("HTTP/1.1 101 Switching Protocols")
        expect(lines).to include("upgrade: custom", "connection: upgrade")
        expect(lines.grep(/\Adate: /).size).to eq(1)
        expect(lines.grep(/hijack|content-length|transfer-encoding/i)).to be_empty
        expect(rest).to eq("after the head:hello")
        client.close
      end
      expect(closes).to eq([:closed])
    end

    it "works under TLS" do
      with_worker(partial_app([]), tls: tls) do |port|
        client = tls_socket(port)
        client.write("GET / HTTP/1.1\r\nHost: localhost\r\n\r\nhello")
        out = read_to_eof(client)
        expect(out).to start_with("HTTP/1.1 101 Switching Protocols\r\n")
        expect(out).to end_with("\r\n\r\nafter the head:hello")
        client.close
      end
    end

    it "answers an HTTP/1.0 request with an HTTP/1.0 status line" do
      with_worker(partial_app([])) do |port|
        out = raw_exchange(port, "GET / HTTP/1.0\r\n\r\nhello")
        expect(out).to start_with("HTTP/1.0 101 Switching Protocols\r\n")
        expect(out).to end_with("\r\n\r\nafter the head:hello")
      end
    end
  end

  describe "over HTTP/2" do
    it "is not offered: rack.hijack? is false and rack.hijack absent" do
      app = ->(env) { [200, {}, ["#{env['rack.hijack?']} #{env.key?('rack.hijack')} #{env.key?('rack.hijack_io')}"]] }
      with_worker(app) do |port|
        out, status = Open3.capture2e("curl", "-s", "--http2-prior-knowledge", "http://127.0.0.1:#{port}/")
        expect(status).to be_success
        expect(out).to eq("false false false")
        out, = Open3.capture2e("curl", "-s", "--http1.1", "http://127.0.0.1:#{port}/")
        expect(out).to eq("true true false")
      end
    end

    it "answers a partial hijack with a 500 and a log line that says why" do
      dir = Dir.mktmpdir("hyperion-h2-hijack")
      rackup = File.join(dir, "config.ru")
      File.write(rackup, <<~RUBY)
        run ->(env) { [200, { "rack.hijack" => ->(io) { io.close } }, []] }
      RUBY
      with_cli(rackup) do |port, _pid, log|
        out, = Open3.capture2e("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--http2-prior-knowledge",
                               "http://127.0.0.1:#{port}/")
        expect(out).to eq("500")
        wait_until { File.read(log).include?("rack.hijack is not available over HTTP/2") }
      end
    end
  end
end
