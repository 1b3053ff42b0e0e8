# frozen_string_literal: true

require "spec_helper"

# hyperionctl (and `hyperion ctl`): Puma's pumactl for Hyperion.
RSpec.describe "hyperionctl" do
  let(:app) { File.join(ServerHelpers::FIXTURES, "ops.ru") }
  let(:dir) { Dir.mktmpdir("hyperion-ctl") }
  let(:ctl) { File.join(ServerHelpers::ROOT, "bin/hyperionctl") }

  def hyperionctl(*args)
    Open3.capture3(RbConfig.ruby, ctl, *args, chdir: dir)
  end

  it "reads the control URL and token from the config file (-C, or config/hyperion.rb) and sends commands" do
    url = "tcp://127.0.0.1:#{free_port}"
    FileUtils.mkdir_p(File.join(dir, "config"))
    File.write(File.join(dir, "config/hyperion.rb"), %(activate_control_app "#{url}", { auth_token: "t0k" }\n))
    with_server("-C", File.join(dir, "config/hyperion.rb"), app) do |port, pid|
      http_get(port)
      out, err, status = hyperionctl("stats")
      expect([err, status.exitstatus]).to eq(["", 0])
      expect(JSON.parse(out)).to include("requests_count" => 1, "max_threads" => 5)
      out, _err, status = Open3.capture3(RbConfig.ruby, ServerHelpers::HYPERION, "ctl", "-C",
                                         File.join(dir, "config/hyperion.rb"), "metrics")
      expect(status.exitstatus).to eq(0)
      expect(prometheus_parse(out)).to include("hyperion_requests")
      _out, err, status = hyperionctl("--control-token", "wrong", "stats")
      expect([err, status.exitstatus]).to eq(["hyperionctl: Unauthorized access to server (wrong auth token)\n", 1])
      out, _err, status = hyperionctl("ready")
      expect([out, status.exitstatus]).to eq(["{\"status\":\"ready\"}\n", 0])
      out, _err, status = hyperionctl("stop")
      expect([out, status.exitstatus]).to eq(["Command stop sent success\n", 0])
      expect(wait_for_exit(pid).exitstatus).to eq(0)
    end
  end

  it "signals the pid in the pidfile when there is no control listener" do
    pidfile = File.join(dir, "server.pid")
    with_server("--pidfile", pidfile, app) do |_port, pid, _out, err|
      out, _err, status = hyperionctl("-P", pidfile, "restart")
      expect([out, status.exitstatus]).to eq(["Command restart sent success\n", 0])
      wait_until(60) { File.read(err).scan("worker listening").size == 2 }
      _out, err_text, status = hyperionctl("-P", pidfile, "stats")
      expect([err_text, status.exitstatus]).to eq(
        ["hyperionctl: stats needs the control listener (activate_control_app or --control-url)\n", 1]
      )
      out, _err, status = hyperionctl("--pidfile", pidfile, "stop")
      expect([out, status.exitstatus]).to eq(["Command stop sent success\n", 0])
      expect(wait_for_exit(pid).exitstatus).to eq(0)
    end
  end

  {
    "no command" => [[], "hyperionctl: give a command: stats, restart, phased-restart, stop, halt, gc-stats, " \
                         "thread-backtraces, metrics, ready\n"],
    "an unknown command" => [%w[reboot], /\Ahyperionctl: unknown command reboot \(use stats, /],
    "nothing to reach the server with" => [%w[stats], /\Ahyperionctl: no control URL and no pidfile/],
    "an unreachable control listener" => [%w[--control-url unix:///nonexistent/ctl.sock stats],
                                          %r{\Ahyperionctl: cannot reach the control listener at unix:///nonexistent/ctl\.sock}],
    "a pidfile that is missing" => [%w[-P /nonexistent/x.pid stop], %r{\Ahyperionctl: no pidfile at /nonexistent/x\.pid\n\z}],
    "an unknown flag" => [%w[--frob stats], /\Ahyperionctl: invalid option: --frob/]
  }.each do |problem, (args, message)|
    it "stops with one line and status 1 for #{problem}" do
      out, err, status = hyperionctl(*args)
      expect(status.exitstatus).to eq(1)
      expect(err).to match(message)
      expect(err.lines.size).to eq(1)
      expect(out).to be_empty
    end
  end
end
