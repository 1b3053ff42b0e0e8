# frozen_string_literal: true

require "spec_helper"

# systemd integration, black-box: a hand-made LISTEN_FDS socket, and
# sd_notify messages read from our own datagram socket.
RSpec.describe "systemd integration" do
  let(:dir) do
    Dir.mktmpdir("hyperion-systemd").tap do |d|
      File.write(File.join(d, "config.ru"), "run ->(_) { [200, {}, ['activated ' + Process.pid.to_s]] }\n")
    end
  end

  def spawn_hyperion(env, args = "", **redirects)
    log = File.join(dir, "server.log")
    # LISTEN_PID must be the server's own pid: `exec` keeps the shell's.
    command = %(LISTEN_PID=$$ exec "#{RbConfig.ruby}" "#{ServerHelpers::HYPERION}" #{args} config.ru)
    pid = Process.spawn({ "HYPERION_LOG" => "info" }.merge(env), "sh", "-c", command,
                        chdir: dir, %i[out err] => [log, "w"], **redirects)
    [pid, log]
  end

  # A datagram socket of our own, standing in for systemd's NOTIFY_SOCKET.
  def notify_socket(name)
    Socket.new(:UNIX, :DGRAM).tap { |s| s.bind(Socket.pack_sockaddr_un(File.join(dir, name))) }
  end

  it "adopts the socket passed as fd 3 (LISTEN_FDS) instead of binding" do
    listener = TCPServer.new("127.0.0.1", 0)
    port = listener.local_address.ip_port
    pid, log = spawn_hyperion({ "LISTEN_FDS" => "1" }, 3 => listener)
    wait_until { File.read(log).include?("listening on") }
    expect(File.read(log)).to include("listening on http://127.0.0.1:#{port}")
    expect(http_get(port).body).to eq("activated #{pid}")
  ensure
    Process.kill("TERM", pid) if pid
    Process.wait(pid) if pid
    listener&.close
  end

  it "sends READY=1 when serving and STOPPING=1 on the way out" do
    notify = notify_socket("notify.sock")
    path = notify.local_address.unix_path
    pid, log = spawn_hyperion({ "NOTIFY_SOCKET" => path }, "-b 127.0.0.1 -p 0")
    ready = Timeout.timeout(20) { notify.recv(4096) }
    expect(ready).to start_with("READY=1\n").and include("STATUS=listening on http://127.0.0.1:", "MAINPID=#{pid}")
    Process.kill("TERM", pid)
    expect(Timeout.timeout(10) { notify.recv(4096) }).to eq("STOPPING=1")
    _, status = Process.wait2(pid)
    expect(status.exitstatus).to eq(0), File.read(log)
  ensure
    notify&.close
  end

  it "pings the watchdog every half WATCHDOG_USEC" do
    notify = notify_socket("watchdog.sock")
    path = notify.local_address.unix_path
    pid, = spawn_hyperion({ "NOTIFY_SOCKET" => path, "WATCHDOG_USEC" => "200000" }, "-b 127.0.0.1 -p 0")
    messages = []
    Timeout.timeout(20) { messages << notify.recv(4096) until messages.count("WATCHDOG=1") >= 3 && messages.any? { |m| m.start_with?("READY=1") } }
    expect(messages.count("WATCHDOG=1")).to be >= 3
  ensure
    Process.kill("TERM", pid) if pid
    Process.wait(pid) if pid
    notify&.close
  end

  it "in cluster mode, the master sends READY=1 once all workers serve, RELOADING=1 on USR2, STOPPING=1 on TERM" do
    notify = notify_socket("cluster.sock")
    path = notify.local_address.unix_path
    pid, log = spawn_hyperion({ "NOTIFY_SOCKET" => path }, "-w 2 -b 127.0.0.1 -p 0")
    ready = Timeout.timeout(20) { notify.recv(4096) }
    expect(ready).to start_with("READY=1\n").and include("STATUS=2 workers serving", "MAINPID=#{pid}")
    expect(File.read(log).scan(/worker \d started/).size).to eq(2)
    Process.kill("USR2", pid)
    expect(Timeout.timeout(10) { notify.recv(4096) }).to start_with("RELOADING=1\nMONOTONIC_USEC=")
    expect(Timeout.timeout(20) { notify.recv(4096) }).to start_with("READY=1\n").and include("MAINPID=#{pid}")
    Process.kill("TERM", pid)
    expect(Timeout.timeout(10) { notify.recv(4096) }).to eq("STOPPING=1")
    _, status = Process.wait2(pid)
    pid = nil
    expect(status.exitstatus).to eq(0), File.read(log)
  ensure
    if pid
      Process.kill("KILL", pid)
      Process.wait(pid)
    end
    notify&.close
  end

  it "keeps an activated socket across a hot restart, failing no request" do
    listener = TCPServer.new("127.0.0.1", 0)
    port = listener.local_address.ip_port
    pid, log = spawn_hyperion({ "LISTEN_FDS" => "1" }, "-w 2", 3 => listener)
    listener.close # the server holds its own copy now
    wait_until { File.read(log).include?("all 2 workers serving") }
    result = under_load(port) do
      Process.kill("USR2", pid)
      wait_until(30) { File.read(log).scan(/old worker \(pid \d+\) left/).size == 2 }
    end
    expect(result["codes"]).to eq("200" => result["codes"]["200"])
    expect(File.read(log).scan("listening on http://127.0.0.1:#{port}").size).to eq(2)
    expect(http_get(port).body).to start_with("activated ")
  ensure
    if pid
      Process.kill("TERM", pid)
      Process.wait(pid)
    end
  end
end
