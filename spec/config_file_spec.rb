# frozen_string_literal: true

require "spec_helper"

# config/hyperion.rb and its precedence under the flags, against the real
# binary. Cluster directives (workers > 1) come with the process-model work.
RSpec.describe "the config file" do
  let(:pki) { TestPKI.new }
  let(:dir) do
    Dir.mktmpdir("hyperion-config").tap do |d|
      FileUtils.mkdir_p(File.join(d, "config"))
      File.write(File.join(d, "config.ru"), <<~RU)
        run ->(env) { [200, {}, ["\#{ENV['RACK_ENV']} \#{env['rack.url_scheme']} \#{Thread.list.count { |t| t.name.to_s.start_with?('hyperion-app') }}"]] }
      RU
    end
  end

  def write_config(text, name: "config/hyperion.rb")
    File.write(File.join(dir, name), text)
  end

  def boot_error(*args)
    _out, err, status = Open3.capture3(RbConfig.ruby, ServerHelpers::HYPERION, *args, chdir: dir)
    expect(status.exitstatus).to eq(1)
    expect(err.lines.size).to eq(1), err
    err
  end

  it "is read from config/hyperion.rb, and flags win over it" do
    write_config(<<~RUBY)
      bind "tcp://127.0.0.1:0"
      threads 2, 3
      environment "staging"
      read_timeout 10
      max_body_bytes 1_000_000
      max_connections 64
    RUBY
    with_cli(chdir: dir, bind: false) { |port| expect(http_get(port).body).to eq("staging http 3") }
    with_cli("-e", "production", "-t", "4", chdir: dir, bind: false) do |port|
      expect(http_get(port).body).to eq("production http 4")
    end
  end

  it "is read from -C PATH, runs its hooks with the worker index and writes the pidfile" do
    record = File.join(dir, "hooks.log")
    pidfile = File.join(dir, "hyperion.pid")
    write_config(<<~RUBY, name: "custom.rb")
      port 0, "127.0.0.1"
      pidfile #{pidfile.inspect}
      on_worker_boot { |i| File.write(#{record.inspect}, "boot \#{i}\\n", mode: "a") }
      on_worker_shutdown { |i| File.write(#{record.inspect}, "shutdown \#{i}\\n", mode: "a") }
    RUBY
    with_cli("-C", "custom.rb", chdir: dir, bind: false) do |port, pid|
      expect(http_get(port).code).to eq("200")
      expect(File.read(pidfile)).to eq("#{pid}\n")
    end
    expect(File.read(record)).to eq("boot 0\nshutdown 0\n")
    expect(File.exist?(pidfile)).to be(false)
  end

  it "serves https from bind \"ssl://...?cert=&key=\", from a tls block, and self-signed without files" do
    write_config(%(bind "ssl://127.0.0.1:0?cert=#{pki.path('chain.pem')}&key=#{pki.path('server.key')}"\n))
    with_cli(chdir: dir, bind: false) do |port|
      out, = Open3.capture2("curl", "-s", "--cacert", pki.path("root.pem"), "--resolve", "localhost:#{port}:127.0.0.1",
                            "https://localhost:#{port}/")
      expect(out).to end_with("https 5")
    end
    write_config(<<~RUBY)
      port 0, "127.0.0.1"
      tls do
        cert #{pki.path('chain.pem').inspect}
        key #{pki.path('server.key').inspect}
      end
    RUBY
    with_cli(chdir: dir, bind: false) do |port|
      out, = Open3.capture2("curl", "-s", "--cacert", pki.path("root.pem"), "--resolve", "localhost:#{port}:127.0.0.1",
                            "https://localhost:#{port}/")
      expect(out).to end_with("https 5")
    end
    write_config(%(bind "ssl://127.0.0.1:0"\n))
    with_cli(chdir: dir, bind: false) do |port, _pid, log|
      expect(Open3.capture2("curl", "-sk", "https://127.0.0.1:#{port}/").first).to end_with("https 5")
      expect(File.read(log)).to include("self-signed development certificate")
    end
  end

  it "applies an h2 block" do
    write_config("port 0, '127.0.0.1'\nh2 max_concurrent_streams: 9\n")
    with_cli(chdir: dir, bind: false) do |port|
      out, = Open3.capture2e("nghttp", "-v", "http://127.0.0.1:#{port}/")
      expect(out).to include("SETTINGS_MAX_CONCURRENT_STREAMS(0x03):9")
    end
  end

  it "binds unix:// sockets and IPv6 tcp:// URIs from the command line" do
    path = File.join(dir, "app.sock")
    with_cli("-b", "unix://#{path}", chdir: dir, bind: false) do
      out, = Open3.capture2("curl", "-s", "--unix-socket", path, "http://localhost/")
      expect(out).to eq(" http 5")
    end
    expect(File.exist?(path)).to be(false)
    with_cli("-b", "tcp://[::1]:0", chdir: dir, bind: false) do |port, _pid, log|
      expect(File.read(log)).to include("listening on http://[::1]:#{port}")
      out, = Open3.capture2("curl", "-s", "-g", "http://[::1]:#{port}/")
      expect(out).to eq(" http 5")
    end
  end

  {
    "an unknown directive" => ["port 0\nbnd 'tcp://127.0.0.1:0'\n", %r{\Ahyperion: config/hyperion\.rb:2: unknown directive `bnd` \(did you mean `bind`\?\)}],
    "a bad value" => ["port 'abc'\n", %r{\Ahyperion: config/hyperion\.rb:1: port expects an Integer in 0\.\.65535, got "abc"}],
    "a bad bind URI" => ["bind 'ftp://x:1'\n", %r{\Ahyperion: config/hyperion\.rb:1: bind ftp://x:1: unknown scheme "ftp"}],
    "a syntax error" => ["port 0\nthreads(\n", %r{\Ahyperion: config/hyperion\.rb:\d+: SyntaxError}],
    "a bad worker count" => ["workers 0\n", %r{\Ahyperion: config/hyperion\.rb:1: workers expects an Integer in 1\.\.1024, got 0}],
    "a bad worker model" => ["worker_model :forks\n", %r{\Ahyperion: config/hyperion\.rb:1: worker_model expects :reuseport or :share}],
    "an unknown tls setting" => ["tls cert: 'a', ciphers: 'b'\n", %r{\Ahyperion: config/hyperion\.rb:1: tls: unknown setting ciphers}],
    "a bad worker_timeout" => ["port 0\nworker_timeout -1\n", %r{\Ahyperion: config/hyperion\.rb:2: worker_timeout expects a positive number of seconds, got -1}],
    "a bad max_connections" => ["port 0\nmax_connections 0\n", %r{\Ahyperion: config/hyperion\.rb:2: max_connections expects an Integer in 1\.\., got 0}],
    "a bad worker_max_rss_mb" => ["worker_max_rss_mb 0\n", %r{\Ahyperion: config/hyperion\.rb:1: worker_max_rss_mb expects an Integer in 1\.\., got 0}],
    "a bad stdout_redirect" => ["stdout_redirect 5\n", %r{\Ahyperion: config/hyperion\.rb:1: stdout_redirect expects a String, got 5}],
    "a bad preload_app!" => ["preload_app! :yes\n", %r{\Ahyperion: config/hyperion\.rb:1: preload_app! expects true or false, got :yes}],
    "a bad set_remote_address" => ["set_remote_address :peer\n", %r{\Ahyperion: config/hyperion\.rb:1: set_remote_address expects :socket, :localhost, a String, header: "X-Real-IP" or proxy_protocol: :v1 or :v2, got :peer\n\z}],
    "a bad PROXY protocol version" => ["set_remote_address proxy_protocol: :v3\n", %r{\Ahyperion: config/hyperion\.rb:1: set_remote_address proxy_protocol: expects :v1 or :v2, got :v3\n\z}],
    "a bad remote address header" => ["port 0\nset_remote_address header: 'X Real IP'\n", %r{\Ahyperion: config/hyperion\.rb:2: set_remote_address header: "X Real IP" is not a header name\n\z}],
    "a bad log_requests" => ["log_requests 'yes'\n", %r{\Ahyperion: config/hyperion\.rb:1: log_requests expects true or false, got "yes"}],
    "a bad log_format" => ["log_format :xml\n", %r{\Ahyperion: config/hyperion\.rb:1: log_format expects :text or :json, got :xml}],
    "a bad drain_delay" => ["drain_delay -1\n", %r{\Ahyperion: config/hyperion\.rb:1: drain_delay expects a number of seconds, 0 or more, got -1}],
    "a TCP control app without a token" =>
      ["activate_control_app 'tcp://127.0.0.1:9293'\n",
       %r{\Ahyperion: config/hyperion\.rb:1: control URL tcp://127\.0\.0\.1:9293: a TCP control listener needs a token}],
    "a bad control app umask" => ["activate_control_app 'unix:///tmp/c.sock', { umask: '077' }\n",
                                  %r{\Ahyperion: config/hyperion\.rb:1: control umask must be an Integer such as 0o077, got "077"}],
    "a control app without a URL" => ["activate_control_app\n", %r{\Ahyperion: config/hyperion\.rb:1: activate_control_app needs a URL}],
    "an unknown control app option" =>
      ["activate_control_app 'unix:///tmp/c.sock', { token: 'x' }\n",
       %r{\Ahyperion: config/hyperion\.rb:1: activate_control_app: unknown option :token \(use auth_token:, no_token:, umask:\)}],
    "a bad unix umask" => ["bind 'unix:///tmp/x.sock?umask=999'\n", %r{\Ahyperion: config/hyperion\.rb:1: bind unix:///tmp/x\.sock\?umask=999: umask must be octal}]
  }.each do |problem, (text, message)|
    it "stops boot with the file, line and a hint for #{problem}" do
      write_config(text)
      expect(boot_error).to match(message)
    end
  end

  it "stops boot with one line for a missing -C file" do
    expect(boot_error("-C", "nope.rb")).to match(/\Ahyperion: cannot read the config file nope\.rb: No such file or directory/)
  end
end
