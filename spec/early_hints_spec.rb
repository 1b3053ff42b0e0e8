# frozen_string_literal: true

require "spec_helper"

# env["rack.early_hints"]: 103 Early Hints over HTTP/1.1 and HTTP/2 (plain and
# TLS), never to HTTP/1.0; off unless `early_hints` / --early-hints /
# Worker.new(early_hints: true).
RSpec.describe "103 Early Hints" do
  let(:pki) { TestPKI.new }
  let(:links) { "</style.css>; rel=preload; as=style\n</app.js>; rel=preload; as=script" }
  let(:app) do
    links = self.links
    lambda do |env|
      env["rack.early_hints"]&.call("link" => links)
      [200, { "content-type" => "text/plain" }, ["early_hints key: #{env.key?('rack.early_hints')}"]]
    end
  end

  def run_client(*command)
    out, status = Open3.capture2e(*command)
    expect(status).to be_success, "#{command.join(' ')}\n#{out}"
    out
  end

  # The status lines and link fields curl -v received, in order.
  def curl_heads(*args)
    run_client("curl", "-sv", *args).lines.grep(/\A< (HTTP|link)/).map { |l| l.sub("< ", "").strip }
  end

  it "sends 103 with each line of a multi-line value as a field, before the 200, on HTTP/1.1 and HTTP/2" do
    expected = lambda do |version|
      ["#{version} 103", "link: </style.css>; rel=preload; as=style", "link: </app.js>; rel=preload; as=script",
       "#{version} 200"]
    end
    with_worker(app, early_hints: true) do |port|
      heads = curl_heads("--http1.1", "http://127.0.0.1:#{port}/")
      expect(heads.map { |h| h.sub(/ (Early Hints|OK)\z/, "") }).to eq(expected.call("HTTP/1.1"))
      heads = curl_heads("--http2-prior-knowledge", "http://127.0.0.1:#{port}/")
      expect(heads).to eq(expected.call("HTTP/2"))
      out = run_client("nghttp", "-v", "http://127.0.0.1:#{port}/")
      fields = out.lines.grep(/recv \(stream_id=13\) (:status|link)/).map { |l| l.split(") ", 2).last.strip }
      expect(fields).to eq([":status: 103", "link: </style.css>; rel=preload; as=style",
                            "link: </app.js>; rel=preload; as=script", ":status: 200"])
    end
  end

  it "sends 103 under TLS, over HTTP/1.1 and h2" do
    with_worker(app, early_hints: true, tls: { cert: pki.path("chain.pem"), key: pki.path("server.key") }) do |port|
      common = ["--cacert", pki.path("root.pem"), "--resolve", "localhost:#{port}:127.0.0.1",
                "https://localhost:#{port}/"]
      expect(curl_heads("--http1.1", *common).first(2)).to eq(["HTTP/1.1 103 Early Hints",
                                                               "link: </style.css>; rel=preload; as=style"])
      expect(curl_heads("--http2", *common).first(2)).to eq(["HTTP/2 103", "link: </style.css>; rel=preload; as=style"])
    end
  end

  it "sends the 103 as soon as the app calls, while the app still works" do
    release = Queue.new
    app = lambda do |env|
      env["rack.early_hints"].call("link" => "</a.css>; rel=preload")
      release.pop
      [200, {}, ["done"]]
    end
    with_worker(app, early_hints: true) do |port|
      socket = TCPSocket.new("127.0.0.1", port)
      socket.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
      hint = +""
      hint << socket.readpartial(1024) until hint.include?("\r\n\r\n")
      expect(hint).to eq("HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n")
      release << true
      expect(read_all(socket, 5)).to start_with("HTTP/1.1 200 OK\r\n").and end_with("done")
    ensure
      release << true
      socket&.close
    end
  end

  it "sends nothing to an HTTP/1.0 client (the callable is there, and does nothing)" do
    with_worker(app, early_hints: true) do |port|
      out = raw_exchange(port, "GET / HTTP/1.0\r\n\r\n")
      expect(out).to start_with("HTTP/1.0 200 OK\r\n").and end_with("early_hints key: true")
      expect(out).not_to include("103")
    end
  end

  it "refuses values with CR or NUL as response headers are refused, and sends nothing" do
    app = lambda do |env|
      errors = ["x\ry", "x\0y"].map do |bad|
        env["rack.early_hints"].call("link" => bad)
      rescue ArgumentError => e
        e.message
      end
      [200, {}, [errors.join(" | ")]]
    end
    with_worker(app, early_hints: true) do |port|
      out = raw_exchange(port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      expect(out).to start_with("HTTP/1.1 200 OK\r\n")
      expect(out).to end_with("header link has a value with CR, NUL or another control character | " \
                              "header link has a value with CR, NUL or another control character")
    end
  end

  it "ignores calls after the response is on its way, also from a later request on the connection" do
    kept = Queue.new
    app = lambda do |env|
      if env["PATH_INFO"] == "/first"
        kept << env["rack.early_hints"]
        return [200, {}, ["first"]]
      end
      kept.pop.call("link" => "</late.css>; rel=preload") # the first request's, long answered
      [200, {}, ["second: no error"]]
    end
    with_worker(app, early_hints: true) do |port|
      out = raw_exchange(port, "GET /first HTTP/1.1\r\nHost: x\r\n\r\n" \
                               "GET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      expect(out).to end_with("second: no error")
      expect(out).not_to include("103")
      expect(out.scan("HTTP/1.1 200 OK").size).to eq(2)
    end
  end

  it "is off by default and with early_hints: false: the env key is absent" do
    [{}, { early_hints: false }].each do |options|
      with_worker(app, **options) do |port|
        out = raw_exchange(port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        expect(out).to end_with("early_hints key: false")
        expect(out).not_to include("103")
      end
    end
    expect { Hyperion::Worker.new(host: "127.0.0.1", port: 0, app: app, read_timeout: 5, early_hints: "yes") }
      .to raise_error(TypeError, /early_hints: expected true, false or nil/)
  end

  describe "from the command line and the config file" do
    let(:dir) do
      Dir.mktmpdir("hyperion-hints").tap do |d|
        FileUtils.mkdir_p(File.join(d, "config"))
        File.write(File.join(d, "config.ru"), <<~RU)
          run lambda { |env|
            env["rack.early_hints"]&.call("link" => "</a.css>; rel=preload")
            [200, {}, ["key: \#{env.key?('rack.early_hints')}"]]
          }
        RU
      end
    end

    def heads_and_body(port)
      out = run_client("curl", "-sv", "http://127.0.0.1:#{port}/")
      [out.lines.grep(/\A< HTTP/).map(&:strip), out.lines.last]
    end

    it "turns on with --early-hints or `early_hints` in config/hyperion.rb; `early_hints false` and the default leave it off" do
      with_cli("--early-hints", chdir: dir) do |port|
        expect(heads_and_body(port)).to eq([["< HTTP/1.1 103 Early Hints", "< HTTP/1.1 200 OK"], "key: true"])
      end
      File.write(File.join(dir, "config/hyperion.rb"), "early_hints\n")
      with_cli(chdir: dir) do |port|
        expect(heads_and_body(port)).to eq([["< HTTP/1.1 103 Early Hints", "< HTTP/1.1 200 OK"], "key: true"])
      end
      File.write(File.join(dir, "config/hyperion.rb"), "early_hints false\n")
      with_cli(chdir: dir) { |port| expect(heads_and_body(port)).to eq([["< HTTP/1.1 200 OK"], "key: false"]) }
      File.delete(File.join(dir, "config/hyperion.rb"))
      with_cli(chdir: dir) { |port| expect(heads_and_body(port)).to eq([["< HTTP/1.1 200 OK"], "key: false"]) }
    end

    it "refuses a config value that is not true or false" do
      File.write(File.join(dir, "config/hyperion.rb"), "early_hints :yes\n")
      _out, err, status = Open3.capture3(RbConfig.ruby, ServerHelpers::HYPERION, chdir: dir)
      expect(status.exitstatus).to eq(1)
      expect(err).to match(/config\/hyperion.rb:1: early_hints expects true or false, got :yes/)
    end
  end
end
