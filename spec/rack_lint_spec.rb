# frozen_string_literal: true

require "spec_helper"
require "rack"
require "rack/lint"

RSpec.describe "a Rack::Lint-wrapped app" do
  let(:app) do
    inner = lambda do |env|
      body = env["rack.input"].read
      [200, { "content-type" => "text/plain", "content-length" => (body.bytesize + 2).to_s }, ["ok", body]]
    end
    lint = Rack::Lint.new(inner)
    # Lint raises Rack::Lint::LintError on a SPEC violation, which the server
    # turns into a 500, so a 200 here means the env and the response passed.
    lambda do |env|
      status, headers, body = lint.call(env)
      [status, headers, body]
    end
  end

  it "passes GET, POST and HEAD on Rack #{Rack.release}" do
    with_worker(app) do |port|
      Net::HTTP.start("127.0.0.1", port) do |http|
        get = http.get("/lint?q=1")
        expect([get.code, get.body]).to eq(["200", "ok"])
        post = http.post("/lint", "payload", "Content-Type" => "text/plain")
        expect([post.code, post.body]).to eq(%w[200 okpayload])
        head = http.head("/lint")
        expect([head.code, head.body]).to eq(["200", nil])
      end
    end
  end

  it "passes a chunked POST" do
    with_worker(app) do |port|
      raw = raw_exchange(port, "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" \
                               "5\r\nhello\r\n0\r\n\r\n")
      expect(parse_responses(raw).first.values_at(0, 2)).to eq([200, "okhello"])
    end
  end

  it "shows a Lint violation as a 500 (so the passing cases above are meaningful)" do
    broken = Rack::Lint.new(->(_env) { [200, { "content-type" => "text/plain" }, [:not_a_string]] })
    with_worker(broken) do |port|
      expect(http_get(port, "/").code).to eq("500")
    end
  end
end
