# frozen_string_literal: true

require "spec_helper"
require "digest/sha1"
require "openssl"

# WebSockets through rack.hijack with the libraries apps use
# (faye-websocket on EventMachine, ActionCable on nio4r), driven by real
# clients: Python `websockets` (spec/support/ws_client.py) and raw frames.
RSpec.describe "WebSockets" do
  CLIENT = File.join(__dir__, "support/ws_client.py")
  FAYE = File.join(__dir__, "fixtures/faye_echo.ru")
  CABLE = File.join(__dir__, "fixtures/action_cable_app.ru")

  def ws_client(*args)
    out, err, status = Open3.capture3("python3", CLIENT, *args.map(&:to_s))
    expect(status).to be_success, "ws_client #{args.join(' ')} failed:\n#{err}"
    JSON.parse(out)
  end

  # A masked client frame (RFC 6455 5.2).
  def client_frame(payload, opcode: 0x1)
    mask = Random.bytes(4)
    masked = payload.bytes.each_with_index.map { |byte, i| byte ^ mask.getbyte(i % 4) }.pack("C*")
    length = payload.bytesize
    header = [0x80 | opcode].pack("C")
    header << (length < 126 ? [0x80 | length].pack("C") : [0x80 | 126, length].pack("Cn"))
    header + mask + masked
  end

  # [opcode, payload] of the next (unmasked) server frame.
  def read_frame(socket)
    first, second = socket.read(2).unpack("CC")
    length = second & 0x7f
    length = socket.read(2).unpack1("n") if length == 126
    [first & 0x0f, socket.read(length)]
  end

  it "echoes 100 text and 100 binary messages with faye-websocket over ws:// and wss://, closing with 1000" do
    with_cli("-t", "2", FAYE) do |port|
      expect(ws_client("echo", "ws://127.0.0.1:#{port}/", 100)).to eq("text" => 100, "binary" => 100,
                                                                        "close_code" => 1000)
      expect(http_get(port, "/hello").body).to eq("hello")
    end
    with_cli("-t", "2", "--tls-self-signed", FAYE) do |port|
      expect(ws_client("echo", "wss://127.0.0.1:#{port}/", 100)).to eq("text" => 100, "binary" => 100,
                                                                         "close_code" => 1000)
    end
  end

  # websocket-driver over a hijacked IO, started before the first read (as
  # ActionCable does): a frame pipelined behind the handshake must be the
  # first thing it reads. (faye-websocket's own API drops frames that arrive
  # before its open event fires, on any server.)
  class DriverSocket
    attr_reader :env, :url

    def initialize(env, io)
      @env = env
      @io = io
      @url = "ws://#{env['HTTP_HOST']}#{env['REQUEST_URI']}"
    end

    def write(data) = @io.write(data)
  end

  let(:driver_echo) do
    require "websocket/driver"
    lambda do |env|
      io = env["rack.hijack"].call
      driver = WebSocket::Driver.rack(DriverSocket.new(env, io))
      driver.on(:message) { |event| driver.text(event.data) }
      driver.on(:close) { io.close }
      driver.start
      Thread.new do
        driver.parse(io.readpartial(4096)) until io.closed?
      rescue EOFError, IOError
        io.close
      end
      [-1, {}, []]
    end
  end

  it "hands websocket-driver a first frame sent right behind the handshake (plain and TLS)" do
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    handshake = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" \
                "Sec-WebSocket-Key: #{key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    accept = [Digest::SHA1.digest(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11")].pack("m0")
    pki = TestPKI.new
    [nil, { cert: pki.path("chain.pem"), key: pki.path("server.key") }].each do |tls|
      with_worker(driver_echo, tls: tls) do |port|
        socket = TCPSocket.new("127.0.0.1", port)
        if tls
          context = OpenSSL::SSL::SSLContext.new
          context.verify_mode = OpenSSL::SSL::VERIFY_NONE
          socket = OpenSSL::SSL::SSLSocket.new(socket, context).tap { |s| s.sync_close = true }
          socket.connect
        end
        socket.write(handshake + client_frame("sent with the handshake"))
        Timeout.timeout(20) do
          head = socket.gets("\r\n\r\n")
          expect(head).to start_with("HTTP/1.1 101")
          expect(head).to include("Sec-WebSocket-Accept: #{accept}")
          expect(read_frame(socket)).to eq([0x1, "sent with the handshake"])
          socket.write(client_frame("", opcode: 0x8))
          expect(read_frame(socket).first).to eq(0x8)
        end
        socket.close
      end
    end
  end

  it "serves ActionCable (Rails 6.1, async adapter): a subscriber receives a broadcast" do
    with_cli("-t", "2", CABLE, env: { "RACK_ENV" => "development" }) do |port|
      result = ws_client("cable", "ws://127.0.0.1:#{port}/cable", "http://127.0.0.1:#{port}/broadcast")
      expect(result).to eq("confirmed" => true, "message" => { "text" => "hello from the server" })
      expect(http_get(port, "/hello").body).to eq("hello")
    end
  end

  it "keeps 1,000 connections echoing on one worker while its app threads answer HTTP", timeout: 600 do
    # One process: bin/hyperion runs a single worker in itself.
    with_cli("-t", "2", FAYE, env: { "HYPERION_SPEC_EM_EPOLL" => "1" }) do |port, pid|
      result = ws_client("many", "ws://127.0.0.1:#{port}/", 1000, "http://127.0.0.1:#{port}/hello")
      # The hello request was answered while all 1,000 connections were
      # open (the client sends it only then, and closes them after).
      expect(result).to include("connected" => 1000, "echoed" => 1000, "hello_status" => 200,
                                "hello_body" => "hello")
      rss = File.read("/proc/#{pid}/status")[/VmHWM:\s+(\d+)/, 1].to_i
      warn format("1,000 WebSockets: all echoed in %.2f s, hello in %.1f ms, worker peak RSS %d MB",
                  result["seconds_to_echo_all"], result["hello_seconds"] * 1000, rss / 1024)
    end
  end
end
