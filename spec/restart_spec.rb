# frozen_string_literal: true

require "spec_helper"

# Hot (USR2) and phased (USR1) restarts, TERM and HUP, black-box with real
# signals while another process keeps sending requests.
RSpec.describe "restarts under load", timeout: 150 do
  let(:dir) do
    Dir.mktmpdir("hyperion-restart").tap do |d|
      File.write(File.join(d, "version"), "v1")
      File.write(File.join(d, "config.ru"), <<~RUBY)
        version = File.read(File.join(__dir__, "version")).strip
        run ->(env) { sleep 0.002; [200, {}, ["\#{version} \#{Process.pid}"]] }
      RUBY
    end
  end

  # Writes a new app version, sends USR1 and waits for both old workers to leave.
  def phased_restart_under_load(port, master, log)
    under_load(port) do
      File.write(File.join(dir, "version"), "v2")
      Process.kill("USR1", master)
      wait_until { File.read(log).scan(/worker \d \(pid \d+\) left/).size == 2 }
    end
  end

  def versions(result) = result["bodies"].keys.map { |body| body.split.first }.uniq.sort
  def pids(result) = result["bodies"].keys.map { |body| Integer(body.split.last) }

  it "USR2 re-executes the master, loads the new code and fails no request" do
    with_cli("-w", "2", chdir: dir) do |port, master, log|
      wait_until { File.read(log).include?("all 2 workers serving") }
      old_workers = children(master)
      result = under_load(port) do
        File.write(File.join(dir, "version"), "v2")
        Process.kill("USR2", master)
        wait_until { File.read(log).scan(/old worker \(pid \d+\) left/).size == 2 }
      end
      expect(result["codes"]).to eq("200" => result["codes"]["200"])
      expect(versions(result)).to eq(%w[v1 v2])
      expect(Process.kill(0, master)).to eq(1) # the same pid, re-executed
      expect(children(master)).not_to include(*old_workers)
      expect(children(master).size).to eq(2)
      expect(http_get(port).body).to start_with("v2 ")
    end
  end

  it "survives signals that arrive while the new image boots" do
    with_cli("-w", "2", chdir: dir) do |port, master, log|
      wait_until { File.read(log).include?("all 2 workers serving") }
      Process.kill("USR2", master)
      sleep 0.1 # the new image is loading Ruby and the gems now
      %w[USR1 HUP TTIN TTOU USR2].each { |name| Process.kill(name, master) }
      wait_until { File.read(log).scan(/old worker \(pid \d+\) left/).size >= 2 }
      expect(Process.kill(0, master)).to eq(1)
      expect(http_get(port).code).to eq("200")
      expect(File.read(log)).not_to include("SignalException")
    end
  end

  it "refuses a USR2 whose new code does not load, and keeps serving" do
    with_cli("-w", "2", chdir: dir) do |port, master, log|
      wait_until { File.read(log).include?("all 2 workers serving") }
      workers = children(master)
      File.write(File.join(dir, "config.ru"), "run ->(env) { [200, {}, ['broken'] }\n") # a syntax error
      Process.kill("USR2", master)
      wait_until { File.read(log).include?("hot restart cancelled") }
      expect(File.read(log)).to include("hyperion: could not load config.ru: SyntaxError")
      expect(children(master).sort).to eq(workers.sort)
      expect(http_get(port).body).to start_with("v1 ")
    end
  end

  it "refuses a USR2 in single-process mode too, without draining" do
    with_cli(chdir: dir) do |port, pid, log|
      File.write(File.join(dir, "config.ru"), "raise 'missing gem'\n")
      Process.kill("USR2", pid)
      wait_until { File.read(log).include?("hot restart cancelled") }
      expect(File.read(log)).to include("RuntimeError: missing gem")
      expect(http_get(port).body).to eq("v1 #{pid}")
    end
  end

  it "USR1 replaces the workers one at a time without a failed request; --no-preload loads the new code" do
    with_cli("-w", "2", "--no-preload", chdir: dir) do |port, master, log|
      wait_until { File.read(log).include?("all 2 workers serving") }
      old_workers = children(master)
      result = phased_restart_under_load(port, master, log)
      expect(result["codes"]).to eq("200" => result["codes"]["200"])
      expect(versions(result)).to eq(%w[v1 v2])
      expect(children(master)).not_to include(*old_workers)
      expect(File.read(log)).to include("each loads the app afresh")
    end
  end

  it "USR1 with preload_app! keeps the loaded code and says so" do
    with_cli("-w", "2", chdir: dir) do |port, master, log|
      wait_until { File.read(log).include?("all 2 workers serving") }
      old_workers = children(master)
      result = phased_restart_under_load(port, master, log)
      expect(result["codes"]).to eq("200" => result["codes"]["200"])
      expect(versions(result)).to eq(%w[v1])
      expect((pids(result) & old_workers).size).to eq(2)
      expect(children(master)).not_to include(*old_workers)
      expect(File.read(log)).to include("keep the code it loaded (send USR2 to load new code)")
    end
  end

  it "USR2 in single-process mode drains, re-executes and fails no request" do
    with_cli(chdir: dir) do |port, pid, log|
      result = under_load(port) do
        File.write(File.join(dir, "version"), "v2")
        Process.kill("USR2", pid)
        wait_until { File.read(log).scan("listening on").size == 2 }
      end
      expect(result["codes"]).to eq("200" => result["codes"]["200"])
      expect(versions(result)).to eq(%w[v1 v2])
      expect(pids(result).uniq).to eq([pid])
    end
  end

  it "runs the hooks in order, with worker indices, across a hot restart" do
    record = File.join(dir, "hooks.log")
    FileUtils.mkdir_p(File.join(dir, "config"))
    File.write(File.join(dir, "config/hyperion.rb"), <<~RUBY)
      workers 2
      note = ->(line) { File.write(#{record.inspect}, line + "\\n", mode: "a") }
      before_fork { note.("before_fork") }
      on_worker_boot { |i| note.("boot \#{i}") }
      on_booted { note.("booted") }
      on_worker_shutdown { |i| note.("shutdown \#{i}") }
      on_restart { note.("restart") }
    RUBY
    with_cli(chdir: dir) do |_port, master, log|
      wait_until { File.read(log).include?("all 2 workers serving") }
      Process.kill("USR2", master)
      wait_until { File.read(log).scan(/old worker \(pid \d+\) left/).size == 2 }
      Process.kill("TERM", master)
      Process.wait(master)
    end
    lines = File.readlines(record, chomp: true)
    first, rest = lines.slice_after("restart").to_a
    expect(first.first).to eq("before_fork")
    expect(first[1, 2].sort).to eq(["boot 0", "boot 1"])
    expect(first[3..]).to eq(%w[booted restart])
    expect(rest.first).to eq("before_fork")
    expect(rest[1, 2].sort).to eq(["boot 0", "boot 1"])
    expect(rest[3]).to eq("booted")
    # The old workers leave after the new ones serve; then TERM stops the new.
    expect(rest[4..].sort).to eq(["shutdown 0", "shutdown 0", "shutdown 1", "shutdown 1"])
  end

  it "logs a failing hook by name and keeps serving" do
    FileUtils.mkdir_p(File.join(dir, "config"))
    File.write(File.join(dir, "config/hyperion.rb"), "workers 2\nbefore_fork { raise 'no cache' }\n" \
                                                     "on_booted { raise ArgumentError, 'late' }\n")
    with_cli(chdir: dir) do |port, _master, log|
      wait_until { File.read(log).include?("on_booted hook raised") }
      expect(File.read(log)).to include("before_fork hook raised RuntimeError: no cache",
                                        "on_booted hook raised ArgumentError: late")
      expect(http_get(port).code).to eq("200")
    end
  end

  it "kills a worker that stops sending heartbeats (worker_timeout) and replaces it" do
    with_cli("-w", "2", "--worker-timeout", "2", chdir: dir) do |port, master, log|
      wait_until { children(master).size == 2 }
      victim = children(master).first
      Process.kill("STOP", victim)
      wait_until(15) { File.read(log).include?("(pid #{victim}) sent no heartbeat for 2.0 s; killing it") }
      wait_until(10) { (kids = children(master)).size == 2 && !kids.include?(victim) }
      expect(http_get(port).code).to eq("200")
    end
  end

  # The heartbeat proves the worker serves, not only that Ruby runs: with its
  # tokio I/O thread wedged (stopped with ptrace, as a bug would leave it) a
  # worker falls silent and is replaced.
  it "replaces a worker whose I/O runtime is wedged though its Ruby threads run" do
    with_cli("-w", "2", "--worker-timeout", "2", chdir: dir) do |port, master, log|
      wait_until { File.read(log).include?("all 2 workers serving") }
      victim = children(master).first
      io_threads = Dir["/proc/#{victim}/task/*/comm"].select { |comm| File.read(comm).strip == "hyperion-io" }
                                                      .map { |comm| comm[%r{task/(\d+)/}, 1] }
      expect(io_threads).not_to be_empty
      freezer = IO.popen(["python3", File.join(__dir__, "support/freeze_thread.py"), *io_threads])
      begin
        expect(freezer.gets).to eq("frozen\n")
        wait_until(20) { File.read(log).include?("(pid #{victim}) sent no heartbeat for 2.0 s; killing it") }
      ensure
        # The master can reap the killed worker only once its tracer is gone.
        Process.kill("KILL", freezer.pid)
        freezer.close
      end
      wait_until(10) { (kids = children(master)).size == 2 && !kids.include?(victim) }
      expect(http_get(port).code).to eq("200")
    end
  end

  it "recycles a worker above worker_max_rss_mb gracefully" do
    File.write(File.join(dir, "config.ru"), <<~RUBY)
      run ->(env) { $ballast = "x" * 150_000_000 if env["PATH_INFO"] == "/grow"; [200, {}, [Process.pid.to_s]] }
    RUBY
    FileUtils.mkdir_p(File.join(dir, "config"))
    File.write(File.join(dir, "config/hyperion.rb"), "workers 2\nworker_max_rss_mb 120\n")
    with_cli(chdir: dir) do |port, master, log|
      wait_until { File.read(log).include?("all 2 workers serving") }
      grown = Integer(http_get(port, "/grow").body)
      wait_until { File.read(log).include?("worker") && File.read(log) =~ /\(pid #{grown}\) uses \d+ MB > worker_max_rss_mb 120; replacing it/ }
      wait_until { File.read(log).include?("(pid #{grown}) left") }
      expect(children(master).size).to eq(2)
      expect(children(master)).not_to include(grown)
      expect(http_get(port).code).to eq("200")
    end
  end

  it "reopens the stdout_redirect files on HUP, in the master and the workers" do
    out = File.join(dir, "out.log")
    err = File.join(dir, "err.log")
    FileUtils.mkdir_p(File.join(dir, "config"))
    File.write(File.join(dir, "config/hyperion.rb"), "workers 2\nstdout_redirect #{out.inspect}, #{err.inspect}\n")
    File.write(File.join(dir, "config.ru"), "run ->(env) { raise 'boom in ' + Process.pid.to_s }\n")
    pid = Process.spawn({ "HYPERION_LOG" => "info" }, RbConfig.ruby, ServerHelpers::HYPERION, "-b", "127.0.0.1",
                        "-p", "0", chdir: dir)
    wait_until { File.exist?(out) && File.read(out).include?("listening on") }
    wait_until { File.read(err).include?("all 2 workers serving") }
    File.rename(err, "#{err}.1")
    File.rename(out, "#{out}.1")
    Process.kill("HUP", pid)
    wait_until { File.exist?(err) && File.read(err).include?("reopened the log files") }
    # The workers' stderr moved too: the app's exception is logged to the new file.
    port = Integer(File.read("#{out}.1")[/listening on http:\/\/[\d.]+:(\d+)/, 1])
    expect(Array.new(4) { http_get(port).code }.uniq).to eq(["500"])
    wait_until { File.read(err).scan("boom in").size == 4 }
    expect(File.read("#{err}.1")).not_to include("reopened", "boom in")
    Process.kill("TERM", pid)
    Process.wait(pid)
    pid = nil
  ensure
    if pid
      Process.kill("KILL", pid)
      Process.wait(pid)
    end
  end
end
