# frozen_string_literal: true

require "spec_helper"

RSpec.describe "bin/hyperion" do
  def hyperion(*args, chdir: ServerHelpers::ROOT)
    Open3.capture3(RbConfig.ruby, ServerHelpers::HYPERION, *args, chdir: chdir)
  end

  it "serves a rackup and prints one listening line with the real port" do
    with_cli(File.join(ServerHelpers::ROOT, "examples/hello.ru")) do |port, _pid, log|
      expect(http_get(port).body).to eq("Hello from Hyperion\n")
      expect(File.read(log).scan(/^listening on .*$/)).to eq(["listening on http://127.0.0.1:#{port}"])
      expect(File.read(log)).to include("worker listening")
    end
  end

  it "--check loads the config and the app without serving: 0 when they load, 1 and one line when not" do
    dir = Dir.mktmpdir("hyperion-check")
    File.write(File.join(dir, "config.ru"), "run ->(_) { [200, {}, ['ok']] }\n")
    out, err, status = hyperion("--check", "-p", "0", chdir: dir)
    expect([out, err, status.exitstatus]).to eq(["", "", 0])
    File.write(File.join(dir, "config.ru"), "run Nope\n")
    _, err, status = hyperion("--check", chdir: dir)
    expect(status.exitstatus).to eq(1)
    expect(err).to match(/\Ahyperion: could not load config\.ru: NameError: uninitialized constant Nope\n\z/)
  end

  it "loads ./config.ru by default" do
    dir = Dir.mktmpdir("hyperion-app")
    File.write(File.join(dir, "config.ru"), "run ->(_) { [200, {}, ['default rackup']] }\n")
    with_cli(chdir: dir) { |port| expect(http_get(port).body).to eq("default rackup") }
  end

  it "logs an app exception with class, message and backtrace, answers 500 and keeps serving" do
    with_cli(File.join(ServerHelpers::FIXTURES, "boom.ru")) do |port, _pid, log|
      expect(http_get(port, "/boom").code).to eq("500")
      expect(http_get(port, "/").body).to eq("fine")
      text = File.read(log)
      expect(text).to include("ArgumentError: kaboom from the app")
      expect(text).to match(/boom\.ru:2/)
    end
  end

  {
    "a missing rackup" => [["nope.ru"], /\Ahyperion: no rackup file at nope\.ru/],
    "a zero --worker-timeout" => [["--worker-timeout", "0"], /\Ahyperion: --worker-timeout must be a positive number of seconds, got 0\.0\n\z/],
    "an unknown flag" => [["--frobnicate"], /\Ahyperion: invalid option: --frobnicate/],
    "a bad port" => [["-p", "70000", "examples/hello.ru"], /\Ahyperion: --port must be between 0 and 65535/],
    "a non-numeric port" => [["-p", "http", "examples/hello.ru"], /\Ahyperion: invalid argument: -p http/],
    "bad threads" => [["-t", "0", "examples/hello.ru"], /\Ahyperion: --threads expects/],
    "a zero --max-connections" => [["-p", "0", "--max-connections", "0", "examples/hello.ru"],
                                   /\Ahyperion: --max-connections: must be between 1 and \d+, got 0\n\z/],
    "a zero --max-connections in cluster mode (checked before forking)" =>
      [["-p", "0", "-w", "2", "--max-connections", "0", "examples/hello.ru"],
       /\Ahyperion: --max-connections: must be between 1 and \d+, got 0\n\z/],
    "a zero --max-connections with --check" => [["--check", "--max-connections", "0", "examples/hello.ru"],
                                                /\Ahyperion: --max-connections: must be between 1 and \d+, got 0\n\z/],
    "a non-numeric --max-connections" => [["--max-connections", "many", "examples/hello.ru"],
                                          /\Ahyperion: invalid argument: --max-connections many/],
    "a bad --proxy-protocol" => [["--proxy-protocol", "v3", "examples/hello.ru"],
                                 /\Ahyperion: invalid argument: --proxy-protocol v3 \(see hyperion --help\)\n\z/],
    "a bad --log-format" => [["--log-format", "xml", "examples/hello.ru"], /\Ahyperion: invalid argument: --log-format xml \(see hyperion --help\)\n\z/],
    "a negative --drain-delay" => [["--drain-delay", "-1", "examples/hello.ru"],
                                   /\Ahyperion: --drain-delay must be 0 or more seconds, got -1\.0\n\z/],
    "a non-numeric --drain-delay" => [["--drain-delay", "soon", "examples/hello.ru"],
                                      /\Ahyperion: invalid argument: --drain-delay soon \(see hyperion --help\)\n\z/],
    "a bad --control-url" => [["--control-url", "ftp://x:1", "examples/hello.ru"],
                              %r{\Ahyperion: bind ftp://x:1: unknown scheme "ftp"}],
    "a ssl:// --control-url" => [["--control-url", "ssl://127.0.0.1:0", "--control-token", "t", "examples/hello.ru"],
                                 %r{\Ahyperion: control URL ssl://127\.0\.0\.1:0: use unix:///path or tcp://HOST:PORT\n\z}],
    "a TCP --control-url without --control-token" =>
      [["--control-url", "tcp://127.0.0.1:0", "examples/hello.ru"],
       %r{\Ahyperion: control URL tcp://127\.0\.0\.1:0: a TCP control listener needs a token}],
    "a rackup with a syntax error" => [[File.join(ServerHelpers::FIXTURES, "syntax_error.ru")],
                                       /\Ahyperion: could not load .*syntax_error\.ru: SyntaxError/]
  }.each do |problem, (args, message)|
    it "stops with one line and status 1 for #{problem}" do
      out, err, status = hyperion(*args)
      expect(status.exitstatus).to eq(1)
      expect(err).to match(message)
      expect(err.lines.size).to eq(1), "expected one line, got:\n#{err}"
      expect(out).to be_empty
    end
  end

  it "stops with one line and status 1 when the port is in use" do
    taken = TCPServer.new("127.0.0.1", 0)
    port = taken.local_address.ip_port
    _out, err, status = hyperion("-b", "127.0.0.1", "-p", port.to_s, "examples/hello.ru")
    expect(status.exitstatus).to eq(1)
    expect(err).to eq("hyperion: could not bind 127.0.0.1:#{port}: address already in use\n")
  ensure
    taken&.close
  end

  it "prints its version and help" do
    out, _err, status = hyperion("--version")
    expect([out, status.exitstatus]).to eq(["hyperion #{Hyperion::VERSION}\n", 0])
    out, _err, status = hyperion("-h")
    expect(status.exitstatus).to eq(0)
    expect(out).to include("Usage: hyperion [options] [config.ru]", "--bind", "--port", "--threads")
  end

  it "accepts Puma's -t MIN:MAX" do
    with_cli("-t", "2:4", File.join(ServerHelpers::ROOT, "examples/hello.ru")) do |port|
      expect(http_get(port).code).to eq("200")
    end
  end

  describe "signals" do
    it "exits within 1 s on SIGINT with every thread idle" do
      with_cli("-t", "8", File.join(ServerHelpers::ROOT, "examples/hello.ru")) do |port, pid|
        http_get(port)
        started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        Process.kill("INT", pid)
        _, status = Process.wait2(pid)
        elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
        expect(status.exitstatus).to eq(0)
        expect(elapsed).to be < 1.0
      end
    end

    it "exits cleanly on SIGTERM after running the shutdown hooks with the worker index" do
      record = File.join(Dir.mktmpdir("hyperion-hooks"), "hooks.log")
      log = File.join(File.dirname(record), "out.log")
      pid = Process.spawn(RbConfig.ruby, "-I", File.join(ServerHelpers::ROOT, "lib"),
                          File.join(ServerHelpers::FIXTURES, "hooks_worker.rb"), record, [:out, :err] => [log, "w"])
      port = wait_for_listening(log, pid)
      expect(http_get(port).body).to eq("hooked")
      Process.kill("TERM", pid)
      _, status = Process.wait2(pid)
      expect(status.exitstatus).to eq(0)
      expect(File.read(record)).to eq("boot 7\nboot2 7\nshutdown 7\nexited run\n")
    end

    it "finishes an in-flight request before exiting on SIGTERM" do
      dir = Dir.mktmpdir("hyperion-slow")
      File.write(File.join(dir, "config.ru"), "run ->(_) { sleep 0.5; [200, {}, ['slow done']] }\n")
      with_cli(chdir: dir) do |port, pid|
        request = Thread.new { http_get(port).body }
        sleep 0.2
        Process.kill("TERM", pid)
        expect(request.value).to eq("slow done")
        _, status = Process.wait2(pid)
        expect(status.exitstatus).to eq(0)
      end
    end
  end
end
