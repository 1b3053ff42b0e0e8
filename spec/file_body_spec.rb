# frozen_string_literal: true

require "spec_helper"
require "rack"
require "rack/files"
require "open3"

# Bodies that answer to_path are read by the I/O side, not through Ruby; a
# response the app framed otherwise (a 206 range, another length) is sent as
# the app framed it.
RSpec.describe "to_path bodies" do
  let(:dir) { Dir.mktmpdir("hyperion-files") }
  let(:content) { Array.new(1024) { |i| format("%06d", i) * 170 + "\n" }.join.b } # ~1 MiB, every line distinct

  before { File.binwrite(File.join(dir, "big.bin"), content) }

  # A body whose #each must not be used: it would send the wrong bytes.
  def file_only_body(path, closes)
    body = Object.new
    body.define_singleton_method(:to_path) { path }
    body.define_singleton_method(:each) { |&b| b.call("each was called") }
    body.define_singleton_method(:close) { closes << :closed }
    body
  end

  it "sends the file named by to_path, without iterating the body, and closes it once" do
    closes = Queue.new
    path = File.join(dir, "big.bin")
    app = ->(_env) { [200, { "content-type" => "application/octet-stream" }, file_only_body(path, closes)] }
    with_worker(app) do |port|
      status, headers, body = parse_responses(raw_exchange(port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", wait: 20)).first
      expect(status).to eq(200)
      expect(headers["content-length"]).to eq([content.bytesize.to_s])
      expect(body).to eq(content)
    end
    expect(closes.size).to eq(1)
  end

  it "serves Rack::Files whole, and a Range as the app framed it (206, only those bytes)" do
    with_worker(Rack::Files.new(dir)) do |port|
      whole = http_get(port, "/big.bin")
      expect(whole.code).to eq("200")
      expect(whole.body.b).to eq(content)
      part = http_get(port, "/big.bin", "Range" => "bytes=1000-1999")
      expect(part.code).to eq("206")
      expect(part["content-range"]).to eq("bytes 1000-1999/#{content.bytesize}")
      expect(part.body.b).to eq(content[1000, 1000])
    end
  end

  it "iterates the body when the app declared another length than the file's" do
    closes = Queue.new
    path = File.join(dir, "big.bin")
    app = ->(_env) { [200, { "content-length" => "15" }, file_only_body(path, closes)] }
    with_worker(app) do |port|
      status, _headers, body = parse_responses(raw_exchange(port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).first
      expect([status, body]).to eq([200, "each was called"])
    end
  end

  it "iterates the body when the file cannot be opened" do
    app = ->(_env) { [200, {}, file_only_body(File.join(dir, "missing"), [])] }
    with_worker(app) do |port|
      expect(http_get(port).body).to eq("each was called")
    end
  end

  it "sends to_path bodies over HTTP/2 too" do
    with_worker(Rack::Files.new(dir)) do |port|
      out, status = Open3.capture2("curl", "-s", "--http2-prior-knowledge", "http://127.0.0.1:#{port}/big.bin")
      expect(status).to be_success
      expect(out.b).to eq(content)
    end
  end
end
