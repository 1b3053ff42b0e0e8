# frozen_string_literal: true

require "spec_helper"

# `workers N`: a master that forks, refills and stops workers, black-box with
# real signals. Hot and phased restarts are in restart_spec.rb.
RSpec.describe "cluster mode", timeout: 120 do
  let(:dir) do
    Dir.mktmpdir("hyperion-cluster").tap do |d|
      File.write(File.join(d, "config.ru"), "run ->(env) { [200, {}, [Process.pid.to_s]] }\n")
    end
  end

  def pids_answering(port, want:, tries: 400)
    seen = []
    tries.times do
      seen |= [http_get(port).body.to_i]
      break if seen.size >= want
    end
    seen
  end

  %w[reuseport share].each do |model|
    it "answers from two distinct worker pids with -w 2 (#{model})" do
      with_cli("-w", "2", chdir: dir, env: { "HYPERION_WORKER_MODEL" => model }) do |port, master|
        pids = pids_answering(port, want: 2)
        expect(pids.size).to eq(2)
        expect(pids).not_to include(master)
        wait_until { children(master).size == 2 }
        expect(children(master).sort).to eq(pids.sort)
      end
    end
  end

  it "ends workers the way Puma does: at_exit handlers run and buffered $stdout is flushed" do
    File.write(File.join(dir, "config.ru"), <<~RUBY)
      at_exit { File.write(File.join(ENV.fetch("MARKERS"), "at_exit-\#{Process.pid}"), "ran") }
      $stdout.sync = false
      $stdout.write("unflushed-from-\#{Process.pid} ")
      run ->(env) { [200, {}, [Process.pid.to_s]] }
    RUBY
    markers = Dir.mktmpdir("hyperion-markers")
    workers = nil
    logged = nil
    with_cli("-w", "2", "--no-preload", chdir: dir, env: { "MARKERS" => markers }) do |port, master, log|
      workers = pids_answering(port, want: 2)
      expect(workers.size).to eq(2)
      Process.kill("TERM", master)
      Timeout.timeout(30) { Process.wait(master) }
      logged = File.read(log)
    end
    workers.each do |pid|
      expect(File.exist?(File.join(markers, "at_exit-#{pid}"))).to be(true), "worker #{pid} ran no at_exit handler"
      expect(logged).to include("unflushed-from-#{pid}")
    end
  end

  it "replaces a killed worker in its slot while requests keep succeeding" do
    with_cli("-w", "2", chdir: dir) do |port, master|
      wait_until { children(master).size == 2 }
      victim = children(master).first
      Process.kill("KILL", victim)
      codes = Array.new(30) { http_get(port).code }
      expect(codes.uniq).to eq(["200"])
      wait_until(3) { (kids = children(master)).size == 2 && !kids.include?(victim) }
    end
  end

  it "adds a worker on TTIN and removes one on TTOU" do
    with_cli("-w", "2", chdir: dir) do |port, master|
      wait_until { children(master).size == 2 }
      Process.kill("TTIN", master)
      wait_until { children(master).size == 3 }
      Process.kill("TTOU", master)
      wait_until { children(master).size == 2 }
      expect(http_get(port).code).to eq("200")
    end
  end

  it "stops every worker gracefully on TERM with zero failed requests under load" do
    File.write(File.join(dir, "config.ru"), "run ->(env) { sleep 0.01; [200, {}, [Process.pid.to_s]] }\n")
    with_cli("-w", "2", chdir: dir) do |port, master|
      wait_until { children(master).size == 2 }
      results = Queue.new
      load = Array.new(4) do
        Thread.new do
          200.times do
            results << Net::HTTP.start("127.0.0.1", port, open_timeout: 2, read_timeout: 10) { |h| h.get("/").code }
          rescue Errno::ECONNREFUSED, Errno::ECONNRESET, EOFError, Net::OpenTimeout => e
            results << e.class.name
            break
          end
        end
      end
      sleep 0.5
      workers = children(master)
      Process.kill("TERM", master)
      _, status = Process.wait2(master)
      load.each(&:join)
      codes = Array.new(results.size) { results.pop }
      expect(status.exitstatus).to eq(0)
      expect(codes.count("200")).to be > 10
      expect(codes - ["200"]).to all(match(/ECONNREFUSED|ECONNRESET|EOFError|OpenTimeout/)) # never a 5xx
      expect(workers.none? { |pid| File.exist?("/proc/#{pid}") && !File.read("/proc/#{pid}/stat").include?(" Z ") })
        .to be(true)
    end
  end

  it "backs off and gives up with a clear message when workers keep dying at boot" do
    FileUtils.mkdir_p(File.join(dir, "config"))
    File.write(File.join(dir, "config/hyperion.rb"), "workers 2\non_worker_boot { |i| raise 'no database' }\n")
    out, status = Open3.capture2e(RbConfig.ruby, ServerHelpers::HYPERION, "-b", "127.0.0.1", "-p", "0", chdir: dir)
    expect(status.exitstatus).to eq(1)
    expect(out).to include("workers keep dying at boot")
    expect(out.scan("restarting it").size).to be_between(1, 10)
  end

  it "serves several binds at once: TCP and a unix socket with its umask" do
    socket = File.join(dir, "app.sock")
    with_cli("-w", "2", "-b", "tcp://127.0.0.1:0", "-b", "unix://#{socket}?umask=0077", chdir: dir, bind: false) do |port, _master, log|
      wait_until { File.read(log).include?("all 2 workers serving") }
      expect(File.read(log)).to include("listening on unix://#{socket}")
      expect(File.stat(socket).mode & 0o777).to eq(0o700)
      expect(http_get(port).code).to eq("200")
      over_unix = UNIXSocket.open(socket) { |s| s.write("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); s.read }
      expect(over_unix).to start_with("HTTP/1.1 200")
    end
    expect(File.exist?(socket)).to be(false)
  end

  it "keeps the busiest worker within 1.2x of the idlest under steady load (reuseport)" do
    with_cli("-w", "2", chdir: dir) do |port, master, _log|
      wait_until { children(master).size == 2 }
      tally = Hash.new(0)
      threads = Array.new(8) do
        Thread.new do
          local = Hash.new(0)
          150.times { local[http_get(port).body] += 1 }
          local
        end
      end
      threads.each { |t| t.value.each { |pid, n| tally[pid] += n } }
      expect(tally.size).to eq(2)
      expect(tally.values.max.fdiv(tally.values.min)).to be <= 1.2
    end
  end

  it "runs no I/O runtime in the master: the workers have it, forked from a runtime-free process" do
    with_cli("-w", "2", chdir: dir) do |_port, master, log|
      wait_until { File.read(log).include?("all 2 workers serving") }
      threads = ->(pid) { Dir["/proc/#{pid}/task/*/comm"].map { |f| File.read(f).strip } }
      expect(threads.(master).grep(/hyperion-io/)).to be_empty
      expect(threads.(children(master).first).grep(/hyperion-io/)).not_to be_empty
    end
  end

  # Inodes of the sockets listening on 127.0.0.1:port, from /proc/net/tcp.
  def listening_inodes(port)
    File.readlines("/proc/net/tcp").drop(1).filter_map do |line|
      fields = line.split
      local, state, inode = fields[1], fields[3], fields[9]
      inode if state == "0A" && local.end_with?(format(":%04X", port))
    end
  end

  def socket_inodes(pid)
    Dir["/proc/#{pid}/fd/*"].filter_map { |fd| File.readlink(fd)[/\Asocket:\[(\d+)\]/, 1] rescue nil }
  end

  it "keeps every slot's SO_REUSEPORT socket in the master, also across a phased restart" do
    with_cli("-w", "2", chdir: dir) do |port, master, log|
      wait_until { File.read(log).include?("all 2 workers serving") }
      slots = listening_inodes(port)
      expect(slots.size).to eq(2) # one socket per worker slot
      expect(socket_inodes(master)).to include(*slots)
      Process.kill("USR1", master)
      wait_until { File.read(log).scan(/worker \d \(pid \d+\) left/).size == 2 }
      expect(listening_inodes(port).sort).to eq(slots.sort) # the same sockets, no new ones
      children(master).each { |worker| expect(socket_inodes(worker) & slots).not_to be_empty }
    end
  end

  it "closes the socket of a slot nobody serves any more (TTIN, then USR2 back to the configured count)" do
    with_cli("-w", "2", chdir: dir) do |port, master, log|
      wait_until { File.read(log).include?("all 2 workers serving") }
      Process.kill("TTIN", master)
      wait_until { listening_inodes(port).size == 3 }
      Process.kill("USR2", master)
      wait_until { File.read(log).scan(/old worker \(pid \d+\) left/).size == 3 }
      wait_until { listening_inodes(port).size == 2 }
      expect(children(master).size).to eq(2)
      held = children(master).flat_map { |worker| socket_inodes(worker) }
      expect(listening_inodes(port)).to all(satisfy { |inode| held.include?(inode) })
      expect(Array.new(20) { http_get(port).code }.uniq).to eq(["200"])
    end
  end
end
