# frozen_string_literal: true

require "spec_helper"
require "rack"
require "rack/files"
require "open3"

# A to_path body of 64 KiB or more on a plain HTTP/1.x connection goes out
# with sendfile(2) (hyperion_sendfile_responses_total counts it), and the
# connection then serves HTTP again. TLS and HTTP/2 keep the read loop; a 206
# and HEAD are sent as the app framed them.
RSpec.describe "sendfile" do
  let(:pki) { TestPKI.new }
  let(:dir) { Dir.mktmpdir("hyperion-sendfile") }
  # ~5 MiB, every line distinct.
  let(:big) { Array.new(5 * 1024) { |i| "#{format("%07d", i) * 128}\n" }.join.b }
  let(:page) { Hyperion::StatsPage.new }
  let(:wait) { gc_stressed? ? 120 : 30 }

  before do
    File.binwrite(File.join(dir, "big.bin"), big)
    File.binwrite(File.join(dir, "small.txt"), "small file\n")
  end

  def metric(name, labels = "")
    text = Hyperion::StatsPage.prometheus([page], 1, 1, 1, 0)
    text[/^#{Regexp.escape(name + labels)} (\d+)$/, 1].to_i
  end

  def sendfiles = metric("hyperion_sendfile_responses_total")

  # Reads one response framed by content-length off a kept-alive socket.
  def read_response(socket)
    raw = +"".b
    Timeout.timeout(wait) do
      raw << socket.readpartial(65_536) until raw.include?("\r\n\r\n")
      head = raw[0, raw.index("\r\n\r\n") + 4]
      length = head[/^content-length: (\d+)\r$/i, 1].to_i
      raw << socket.readpartial(1 << 20) while raw.bytesize < head.bytesize + length
      expect(raw.bytesize).to eq(head.bytesize + length), "nothing past the body"
    end
    parse_responses(raw).first
  end

  it "sends a large file byte for byte, then serves the next request on the same connection, pipelined too" do
    with_worker(Rack::Files.new(dir), stats: page) do |port|
      expect(curl_get("http://127.0.0.1:#{port}/big.bin").b).to eq(big)
      expect(sendfiles).to eq(1)

      socket = TCPSocket.new("127.0.0.1", port)
      socket.write("GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
      status, headers, body = read_response(socket)
      expect([status, headers["content-length"], headers["connection"]]).to eq([200, [big.bytesize.to_s], nil])
      expect(headers["date"]).not_to be_nil
      expect(body).to eq(big)
      socket.write("GET /small.txt HTTP/1.1\r\nHost: x\r\n\r\n")
      expect(read_response(socket)[2]).to eq("small file\n")
      socket.write("GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
      expect(read_response(socket)[2]).to eq(big)
      socket.close
      expect(sendfiles).to eq(3)

      # Both requests in one write: the second was read with the first, and
      # the connection's next hyper session answers it after the file.
      pipelined = TCPSocket.new("127.0.0.1", port)
      pipelined.write("GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\nGET /big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      responses = parse_responses(read_all(pipelined, wait))
      expect(responses.map { |status, _, body| [status, body == big] }).to eq([[200, true], [200, true]])
      expect(responses.last[1]["connection"]).to eq(["close"])
      pipelined.close
      expect(sendfiles).to eq(5)
      expect(metric("hyperion_sendfile_bytes_total")).to eq(5 * big.bytesize)
    end
  end

  it "uses sendfile on a Unix socket too" do
    path = File.join(dir, "hyperion.sock")
    with_worker(Rack::Files.new(dir), stats: page, listener: UNIXServer.new(path)) do
      out, status = Open3.capture2("curl", "-sS", "--max-time", "300", "--unix-socket", path, "http://x/big.bin")
      expect(status).to be_success
      expect(out.b).to eq(big)
      expect(sendfiles).to eq(1)
    end
  end

  it "keeps the read loop under TLS and HTTP/2, and sends a 206 and HEAD as the app framed them" do
    with_worker(Rack::Files.new(dir), stats: page,
                                      tls: { cert: pki.path("chain.pem"), key: pki.path("server.key") }) do |port|
      %w[--http1.1 --http2].each do |version|
        out, status = Open3.capture2("curl", "-sS", version, "--cacert", pki.path("root.pem"),
                                     "--resolve", "localhost:#{port}:127.0.0.1", "https://localhost:#{port}/big.bin")
        expect(status).to be_success
        expect(out.b).to eq(big), version
      end
    end
    with_worker(Rack::Files.new(dir), stats: page) do |port|
      out, status = Open3.capture2("curl", "-sS", "--http2-prior-knowledge", "http://127.0.0.1:#{port}/big.bin")
      expect(status).to be_success
      expect(out.b).to eq(big)

      part = http_get(port, "/big.bin", "Range" => "bytes=1000000-1999999")
      expect(part.code).to eq("206")
      expect(part["content-range"]).to eq("bytes 1000000-1999999/#{big.bytesize}")
      expect(part.body.b).to eq(big[1_000_000, 1_000_000])

      status, headers, body = parse_responses(raw_exchange(port, "HEAD /big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).first
      expect([status, headers["content-length"], body]).to eq([200, [big.bytesize.to_s], ""])
    end
    expect(sendfiles).to eq(0)
  end

  it "drops a client that stops reading after write_timeout, and serves others meanwhile" do
    huge = "x" * (64 * 1024 * 1024) # more than both socket buffers hold
    File.binwrite(File.join(dir, "huge.bin"), huge)
    with_worker(Rack::Files.new(dir), stats: page, thread_count: 1, write_timeout: 0.5) do |port|
      stalled = TCPSocket.new("127.0.0.1", port)
      stalled.write("GET /huge.bin HTTP/1.1\r\nHost: x\r\n\r\n")
      wait_until(wait) { sendfiles == 1 }
      expect(http_get(port, "/small.txt").body).to eq("small file\n")
      # The stalled exchange ends (counted) once the server gave up on it.
      wait_until(wait) { metric("hyperion_requests_total", '{status_class="2xx"}') == 2 }
      received = 0
      begin
        loop { received += stalled.read_nonblock(1 << 20).bytesize }
      rescue IO::WaitReadable
        retry if stalled.wait_readable(5)
      rescue EOFError, Errno::ECONNRESET
        nil
      end
      expect(received).to be < huge.bytesize
      expect(http_get(port, "/big.bin").body.b).to eq(big)
    ensure
      stalled&.close
    end
  end

  it "runs rack.after_reply and rack.response_finished once the file is sent" do
    calls = Queue.new
    files = Rack::Files.new(dir)
    app = lambda do |env|
      env["rack.after_reply"] << -> { calls << [:after_reply] }
      env["rack.response_finished"] << ->(_env, status, _headers, error) { calls << [:response_finished, status, error] }
      files.call(env)
    end
    with_worker(app, stats: page) do |port|
      expect(curl_get("http://127.0.0.1:#{port}/big.bin").b).to eq(big)
      expect(Timeout.timeout(wait) { [calls.pop, calls.pop] }).to eq([[:after_reply], [:response_finished, 200, nil]])
      expect(sendfiles).to eq(1)
    end
  end

  it "logs the file's byte count in the access log" do
    rackup = File.join(dir, "files.ru")
    File.write(rackup, "require \"rack/files\"\nrun Rack::Files.new(#{dir.dump})\n")
    with_server("--log-requests", rackup, env: { "HYPERION_LOG" => "off" }) do |port, _pid, out|
      expect(curl_get("http://127.0.0.1:#{port}/big.bin").b).to eq(big)
      expect(http_get(port, "/big.bin", "Range" => "bytes=0-99").body.bytesize).to eq(100)
      wait_until(30) { json_lines(out).size >= 2 }
      whole, part = json_lines(out)
      expect(whole).to include("path" => "/big.bin", "status" => 200, "bytes" => big.bytesize)
      expect(part).to include("path" => "/big.bin", "status" => 206, "bytes" => 100)
    end
  end
end
