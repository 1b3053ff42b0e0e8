# frozen_string_literal: true

require "spec_helper"
require "time"

# The access log (log_requests / --log-requests): one line per request on
# stdout, written by the tokio side, for HTTP/1.1 and HTTP/2.
RSpec.describe "the access log" do
  let(:app) { File.join(ServerHelpers::FIXTURES, "ops.ru") }

  def wait_for_lines(path, count)
    wait_until(30) { json_lines(path).size >= count }
    json_lines(path)
  end

  it "logs every request as JSON on stdout when stdout is not a terminal, HTTP/2 included" do
    with_server("--log-requests", app, env: { "HYPERION_LOG" => "off" }) do |port, _pid, out, err|
      expect(http_get(port, "/a/b?x=1&y=%22", "X-Request-Id" => "req-42").body).to eq("hello")
      expect(http_get(port, "/status/404").code).to eq("404")
      expect(http_get(port, "/rid").body).to eq("rid")
      h2, = Open3.capture2("curl", "-s", "--http2-prior-knowledge", "http://127.0.0.1:#{port}/h2?q")
      expect(h2).to eq("hello")
      lines = wait_for_lines(out, 4)
      expect(lines.size).to eq(4)
      first, missing, rid, over_h2 = lines
      expect(first).to include("remote_addr" => "127.0.0.1", "method" => "GET", "path" => "/a/b",
                               "query" => "x=1&y=%22", "protocol" => "HTTP/1.1", "status" => 200, "bytes" => 5,
                               "request_id" => "req-42", "worker" => 0)
      expect(first["duration"]).to be_a(Float).and be > 0
      expect(Time.iso8601(first["time"])).to be_within(120).of(Time.now)
      expect(missing).to include("path" => "/status/404", "status" => 404, "bytes" => 6, "request_id" => nil)
      expect(rid["request_id"]).to eq("made-by-app")
      expect(over_h2).to include("protocol" => "HTTP/2", "path" => "/h2", "query" => "q", "status" => 200,
                                 "bytes" => 5)
      expect(File.read(err)).not_to include("hyperion::access"), "HYPERION_LOG=off silences stderr, not the access log"
    end
  end

  it "logs a request whose connection the app took over (rack.hijack) as 101, not as a client that left" do
    with_server("--log-requests", app) do |port, _pid, out|
      expect(http_get(port, "/hijack").body).to eq("hijacked")
      lines = wait_for_lines(out, 1)
      expect(lines.first).to include("path" => "/hijack", "status" => 101, "bytes" => 0)
      expect(http_get(port).body).to eq("hello"), "the worker serves on after the hijack"
    end
  end

  it "writes text lines with --log-format text" do
    with_server("--log-requests", "--log-format", "text", app) do |port, _pid, out|
      http_get(port, "/t?k=v", "X-Request-Id" => "abc")
      wait_until(30) { File.read(out).include?("\"GET") }
      line = File.readlines(out).find { |l| l.include?("\"GET") }
      expect(line).to match(%r{\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z 127\.0\.0\.1 "GET /t\?k=v HTTP/1\.1" 200 5 \d+\.\d{6} worker=0 request_id=abc\n\z})
    end
  end

  it "is off by default, as in Puma" do
    with_server(app) do |port, _pid, out|
      5.times { expect(http_get(port).code).to eq("200") }
      expect(File.read(out)).not_to include("\"GET")
      expect(File.readlines(out).grep(/\A\{/)).to be_empty
    end
  end

  it "names the worker that served each request in a cluster, and log_requests works from the config file" do
    dir = Dir.mktmpdir("hyperion-access")
    File.write(File.join(dir, "hyperion.rb"), "workers 2\nlog_requests\nlog_format :json\n")
    with_server("-C", File.join(dir, "hyperion.rb"), app) do |port, _pid, out|
      # New connections spread over both workers' SO_REUSEPORT sockets.
      wait_until(60) do
        http_get(port)
        json_lines(out).map { |l| l["worker"] }.uniq.sort == [0, 1]
      end
      expect(json_lines(out).map { |l| l["status"] }.uniq).to eq([200])
    end
  end
end
