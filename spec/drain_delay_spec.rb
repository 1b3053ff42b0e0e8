# frozen_string_literal: true

require "spec_helper"

# drain_delay: on TERM the server keeps serving for N seconds while the
# control listener's /ready answers 503 (so a load balancer's health check
# takes it out of rotation), then stops accepting and drains: Kubernetes'
# preStop pattern without a sleep in the pod spec.
RSpec.describe "drain_delay" do
  let(:app) { File.join(ServerHelpers::FIXTURES, "ops.ru") }
  let(:dir) { Dir.mktmpdir("hyperion-drain") }
  let(:control) { "unix://#{File.join(dir, 'ctl.sock')}" }
  let(:delay) { 6 }

  def monotonic = Process.clock_gettime(Process::CLOCK_MONOTONIC)

  # Sends TERM, then for `window` seconds polls /ready and sends requests, on
  # fresh connections and on one kept alive. Returns [seconds until /ready
  # said 503, the statuses of every request].
  def term_and_watch(pid, port, window)
    keep_alive = Net::HTTP.start("127.0.0.1", port, read_timeout: 10)
    expect(keep_alive.get("/").code).to eq("200")
    sent = monotonic
    Process.kill("TERM", pid)
    unready_after = nil
    statuses = []
    while monotonic - sent < window
      unready_after ||= monotonic - sent if control_get(control, "/ready")[0] == 503
      statuses << http_get(port).code
      statuses << keep_alive.get("/").code
    end
    [unready_after, statuses, sent]
  ensure
    keep_alive&.finish if keep_alive&.started?
  end

  it "keeps a single worker serving through the delay while /ready answers 503, then stops", timeout: 120 do
    with_server("--drain-delay", delay.to_s, "--control-url", control, app) do |port, pid|
      expect(control_get(control, "/ready")[0, 2]).to eq([200, '{"status":"ready"}'])
      # Stop sending well inside the delay: the server's delay starts when
      # the TERM arrives, after it was sent.
      unready_after, statuses, sent = term_and_watch(pid, port, delay / 2.0)
      expect(unready_after).not_to be_nil, "/ready never answered 503 within the delay"
      expect(statuses.size).to be >= 2
      expect(statuses).to all(eq("200"))
      expect(control_get(control, "/ready")[0, 2]).to eq([503, '{"status":"draining"}'])
      expect(wait_for_exit(pid, 60).exitstatus).to eq(0)
      expect(monotonic - sent).to be >= delay
    end
  end

  it "keeps a cluster serving through the delay while the master's /ready answers 503, then stops", timeout: 120 do
    with_server("-w", "2", "--drain-delay", delay.to_s, "--control-url", control, app) do |port, pid|
      wait_until(60) { control_get(control, "/ready")[0] == 200 }
      workers = children(pid)
      unready_after, statuses, sent = term_and_watch(pid, port, delay / 2.0)
      expect(unready_after).not_to be_nil
      expect(statuses).to all(eq("200"))
      expect(children(pid)).to match_array(workers)
      expect(wait_for_exit(pid, 60).exitstatus).to eq(0)
      expect(monotonic - sent).to be >= delay
    end
  end

  it "stops at once on a second TERM during the delay", timeout: 120 do
    with_server("--drain-delay", "600", "--control-url", control, app) do |_port, pid|
      Process.kill("TERM", pid)
      wait_until(30) { control_get(control, "/ready")[0] == 503 }
      Process.kill("TERM", pid)
      expect(wait_for_exit(pid, 60).exitstatus).to eq(0)
    end
  end

  # The flag is parsed as a Float: 0.0 once failed the Worker's check (which
  # took only Integer 0 for "no delay") and the server did not boot.
  it "is off with --drain-delay 0 (and drain_delay: 0.0): the server boots, and TERM stops it without a delay" do
    with_server("--drain-delay", "0", "--control-url", control, app) do |port, pid, _out, err|
      expect(http_get(port).body).to eq("hello")
      Process.kill("TERM", pid)
      expect(wait_for_exit(pid, 60).exitstatus).to eq(0)
      expect(File.read(err)).not_to include("drain_delay")
    end
    with_worker(->(_env) { [200, {}, ["ok"]] }, drain_delay: 0.0) { |port| expect(http_get(port).body).to eq("ok") }
  end

  it "is a Worker keyword: TERM's stop waits for it, a stop without a signal does not" do
    socket = UNIXServer.new(File.join(dir, "w.sock"))
    worker_control = "unix://#{File.join(dir, 'w.sock')}"
    with_worker(->(_env) { [200, {}, ["ok"]] }, drain_delay: 30, control: { listener: socket }) do |port, worker|
      worker.stop(Signal.list.fetch("TERM"))
      expect(control_get(worker_control, "/ready")[0]).to eq(503)
      expect(http_get(port).body).to eq("ok")
      worker.stop # what `with_worker` would do anyway: at once, not 30 s later
      wait_until(20) { !port_open?(port) }
    end
  end

  def port_open?(port)
    TCPSocket.new("127.0.0.1", port).close
    true
  rescue SystemCallError
    false
  end
end
