# frozen_string_literal: true

require "spec_helper"

# The control listener (activate_control_app / --control-url): Puma's
# endpoints, /metrics and /ready; served by the worker's tokio side in a
# single process and by the master in a cluster.
RSpec.describe "the control listener" do
  let(:app) { File.join(ServerHelpers::FIXTURES, "ops.ru") }
  let(:dir) { Dir.mktmpdir("hyperion-control") }
  let(:socket_path) { File.join(dir, "ctl.sock") }
  let(:control) { "unix://#{socket_path}" }

  def monotonic = Process.clock_gettime(Process::CLOCK_MONOTONIC)

  describe "in a single worker" do
    it "answers /stats, /metrics, /ready and /gc-stats while every app thread is busy, without taking one" do
      gate = Queue.new
      entered = Queue.new
      blocking = lambda do |_env|
        entered << true
        gate.pop
        [200, {}, ["released"]]
      end
      commands = Hyperion::Control::Commands.new(restart: -> {}, phased_restart: -> {}, stop: -> {}, halt: -> {})
      listener = UNIXServer.new(socket_path)
      with_worker(blocking, thread_count: 2, control: { listener: listener, handler: commands }) do |port|
        clients = Array.new(3) { Thread.new { http_get(port, "/").body } }
        2.times { entered.pop } # both app threads are now inside the app, and stay there
        wait_until(30) { JSON.parse(control_get(control, "/stats")[1])["backlog"] == 1 }

        answered = {}
        %w[/stats /metrics /ready /gc-stats].each do |target|
          started = monotonic
          answered[target] = control_get(control, target)
          # Generous: the point is that nothing waits for an app thread,
          # which would never come back before the gate opens.
          expect(monotonic - started).to be < 10
        end
        expect(entered).to be_empty
        status, body = answered["/stats"]
        expect(status).to eq(200)
        stats = JSON.parse(body)
        expect(stats.keys).to eq(%w[started_at backlog running pool_capacity max_threads requests_count busy_threads])
        expect(stats).to include("backlog" => 1, "running" => 2, "pool_capacity" => 0, "max_threads" => 2,
                                 "requests_count" => 2, "busy_threads" => 2)
        metrics = prometheus_parse(answered["/metrics"][1])
        expect(sample(metrics, "hyperion_busy_threads")).to eq(2)
        expect(sample(metrics, "hyperion_queue_depth")).to eq(1)
        expect(sample(metrics, "hyperion_connections_open", labels: { protocol: "http1" })).to eq(3)
        expect(answered["/ready"][0, 2]).to eq([200, '{"status":"ready"}'])
        expect(answered["/gc-stats"][0]).to eq(200)
        expect(JSON.parse(answered["/gc-stats"][1])).to include("count")

        3.times { gate << :go }
        expect(clients.map(&:value)).to eq(%w[released released released])
        expect(JSON.parse(control_get(control, "/stats")[1])).to include("busy_threads" => 0, "requests_count" => 3)
      end
    end

    it "refuses a missing or wrong token with 403, takes it from the query or a bearer header, and leaves /ready open" do
      url = "tcp://127.0.0.1:#{free_port}"
      with_server("--control-url", url, "--control-token", "s3cret", app) do
        expect(control_get(url, "/stats")[0, 2]).to eq([403, "Invalid auth token"])
        expect(control_get(url, "/stats?token=wrong")[0]).to eq(403)
        expect(control_get(url, "/stop", headers: { "Authorization" => "Bearer nope" })[0]).to eq(403)
        expect(control_get(url, "/nothing-here")[0]).to eq(403)
        expect(control_get(url, "/stats?token=s3cret")[0]).to eq(200)
        expect(control_get(url, "/stats", headers: { "Authorization" => "Bearer s3cret" })[0]).to eq(200)
        expect(control_get(url, "/nothing-here?token=s3cret")[0, 2]).to eq([404, "Unsupported action"])
        expect(control_get(url, "/ready")[0]).to eq(200)
        expect(control_get(url, "/ready?token=wrong")[0]).to eq(403)
        bt_status, bt_body = control_get(url, "/thread-backtraces?token=s3cret")
        expect(bt_status).to eq(200)
        names = JSON.parse(bt_body).map { |t| t["name"] }
        expect(names.grep(/hyperion-app-0/).size).to eq(1)
        expect(names.grep(/hyperion-control/).size).to eq(1)
      end
    end

    it "exposes Prometheus text that prometheus_client parses: requests by class, durations, queue, connections" do
      with_server("--control-url", control, app) do |port|
        3.times { expect(http_get(port).code).to eq("200") }
        expect(http_get(port, "/status/404").code).to eq("404")
        expect(http_get(port, "/status/503").code).to eq("503")
        h2, = Open3.capture2("curl", "-s", "--http2-prior-knowledge", "http://127.0.0.1:#{port}/")
        expect(h2).to eq("hello")
        metrics = nil
        wait_until(30) do
          metrics = prometheus_parse(control_get(control, "/metrics")[1])
          sample(metrics, "hyperion_request_duration_seconds", name: "hyperion_request_duration_seconds_count") == 6
        end
        expect(metrics["hyperion_requests"]["type"]).to eq("counter")
        expect(sample(metrics, "hyperion_requests", name: "hyperion_requests_total",
                                                    labels: { status_class: "2xx" })).to eq(4)
        expect(sample(metrics, "hyperion_requests", name: "hyperion_requests_total",
                                                    labels: { status_class: "4xx" })).to eq(1)
        expect(sample(metrics, "hyperion_requests", name: "hyperion_requests_total",
                                                    labels: { status_class: "5xx" })).to eq(1)
        expect(metrics["hyperion_request_duration_seconds"]["type"]).to eq("histogram")
        expect(sample(metrics, "hyperion_request_duration_seconds", name: "hyperion_request_duration_seconds_bucket",
                                                                    labels: { le: "+Inf" })).to eq(6)
        expect(sample(metrics, "hyperion_queue_wait_seconds", name: "hyperion_queue_wait_seconds_count")).to eq(6)
        expect(sample(metrics, "hyperion_queue_depth")).to eq(0)
        expect(sample(metrics, "hyperion_max_threads")).to eq(5)
        expect(sample(metrics, "hyperion_app_threads")).to eq(5)
        expect(sample(metrics, "hyperion_connections", name: "hyperion_connections_total",
                                                       labels: { protocol: "http1" })).to eq(5)
        expect(sample(metrics, "hyperion_connections", name: "hyperion_connections_total",
                                                       labels: { protocol: "http2" })).to eq(1)
        expect(sample(metrics, "hyperion_workers")).to eq(1)
        expect(sample(metrics, "hyperion_worker_boots", name: "hyperion_worker_boots_total")).to eq(1)
        expect(sample(metrics, "hyperion_worker_restarts", name: "hyperion_worker_restarts_total")).to eq(0)
      end
    end

    it "restarts (hot, same pid), stops, and halts at once with a request in flight", timeout: 180 do
      pidfile = File.join(dir, "pid")
      with_server("--control-url", control, "--pidfile", pidfile, app) do |port, pid, _out, err|
        expect(control_get(control, "/restart")[0, 2]).to eq([200, '{ "status": "ok" }'])
        wait_until(60) { File.read(err).include?("hot restart: draining") && File.read(err).scan("worker listening").size == 2 }
        expect(http_get(port).body).to eq("hello")
        expect(Process.waitpid(pid, Process::WNOHANG)).to be_nil
        wait_until(30) { File.socket?(socket_path) && control_get(control, "/ready")[0] == 200 }

        in_flight = Thread.new { http_get(port, "/sleep?s=60") rescue $! } # rubocop:disable Style/RescueModifier
        wait_until(30) { JSON.parse(control_get(control, "/stats")[1])["busy_threads"] == 1 }
        started = monotonic
        expect(control_get(control, "/halt")[0]).to eq(200)
        expect(wait_for_exit(pid).exitstatus).to eq(0)
        expect(monotonic - started).to be < 30 # not the in-flight request's 60 s, nor graceful_timeout
        expect(in_flight.value).to be_a(StandardError)
        expect(File.exist?(pidfile)).to be(false)
        expect(File.exist?(socket_path)).to be(false)
      end

      with_server("--control-url", control, app) do |_port, pid|
        expect(control_get(control, "/stop")[0]).to eq(200)
        expect(wait_for_exit(pid).exitstatus).to eq(0)
      end
    end

    it "is read by Puma's own pumactl" do
      url = "tcp://127.0.0.1:#{free_port}"
      with_server("--control-url", url, "--control-token", "tok", app) do |port|
        http_get(port)
        out, status = Open3.capture2e("pumactl", "-C", url, "-T", "tok", "stats")
        expect(status).to be_success, out
        expect(out.lines.first).to eq("Command stats sent success\n")
        expect(JSON.parse(out.lines.last)).to include("requests_count" => 1, "max_threads" => 5)
        out, status = Open3.capture2e("pumactl", "-C", url, "-T", "bad", "stats")
        expect(status).not_to be_success
        expect(out).to include("Unauthorized access to server (wrong auth token)")
      end
    end
  end

  describe "in a cluster, served by the master" do
    it "reports Puma's cluster stats, sums /metrics over the workers (also those gone), and runs commands",
       timeout: 240 do
      with_server("-w", "2", "--control-url", control, app) do |port, pid|
        wait_until(60) { control_get(control, "/ready")[0] == 200 && JSON.parse(control_get(control, "/stats")[1])["booted_workers"] == 2 }
        10.times { expect(http_get(port).code).to eq("200") }
        stats = JSON.parse(control_get(control, "/stats")[1])
        expect(stats.keys).to eq(%w[started_at workers phase booted_workers old_workers worker_status])
        expect(stats).to include("workers" => 2, "phase" => 0, "booted_workers" => 2, "old_workers" => 0)
        expect(stats["worker_status"].map { |w| w["index"] }.sort).to eq([0, 1])
        stats["worker_status"].each do |worker|
          expect(worker.keys).to eq(%w[started_at pid index phase booted last_checkin last_status])
          expect(worker["last_status"].keys).to eq(%w[backlog running pool_capacity max_threads requests_count
                                                      busy_threads])
          expect(children(pid)).to include(worker["pid"])
        end
        expect(stats["worker_status"].sum { |w| w["last_status"]["requests_count"] }).to eq(10)

        victim = stats["worker_status"].first["pid"]
        Process.kill("KILL", victim)
        wait_until(60) do
          workers = JSON.parse(control_get(control, "/stats")[1])["worker_status"]
          workers.none? { |w| w["pid"] == victim } && workers.all? { |w| w["booted"] }
        end
        # The master counts a boot when the worker reports in, which can come
        # after /stats already shows it booted: wait for the count itself.
        metrics = nil
        wait_until(60) do
          metrics = prometheus_parse(control_get(control, "/metrics")[1])
          sample(metrics, "hyperion_worker_boots", name: "hyperion_worker_boots_total") == 3
        end
        expect(sample(metrics, "hyperion_requests", name: "hyperion_requests_total",
                                                    labels: { status_class: "2xx" })).to eq(10)
        expect(sample(metrics, "hyperion_worker_restarts", name: "hyperion_worker_restarts_total")).to eq(1)
        expect(sample(metrics, "hyperion_worker_boots", name: "hyperion_worker_boots_total")).to eq(3)
        expect(sample(metrics, "hyperion_workers")).to eq(2)
        expect(sample(metrics, "hyperion_max_threads")).to eq(10)

        expect(control_get(control, "/phased-restart")[0]).to eq(200)
        wait_until(90) do
          stats = JSON.parse(control_get(control, "/stats")[1])
          stats["phase"] == 1 && stats["worker_status"].size == 2 && stats["worker_status"].all? { |w| w["phase"] == 1 && w["booted"] }
        end
        expect(http_get(port).code).to eq("200")
        gc = JSON.parse(control_get(control, "/gc-stats")[1])
        expect(gc).to include("count")

        workers = children(pid)
        expect(control_get(control, "/halt")[0]).to eq(200)
        expect(wait_for_exit(pid).exitstatus).to eq(0)
        workers.each { |worker| expect { Process.kill(0, worker) }.to raise_error(Errno::ESRCH) }
      end
    end
  end

  it "ends a master's control connection for its client even when a worker was forked while it was open",
     timeout: 120 do
    with_server("-w", "2", "--control-url", control, app) do |_port, pid|
      wait_until(60) { JSON.parse(control_get(control, "/stats")[1])["booted_workers"] == 2 }
      client = UNIXSocket.new(socket_path)
      client.write("GET /stats HTTP/1.0\r\n")
      # Accepted in order: once a later connection is answered, ours was accepted too.
      expect(control_get(control, "/ready")[0]).to eq(200)
      Process.kill("TTIN", pid) # the master forks a worker, which inherits our connection
      wait_until(60) { JSON.parse(control_get(control, "/stats")[1])["booted_workers"] == 3 }
      client.write("\r\n")
      answer = +""
      eof = false
      deadline = monotonic + 20
      while monotonic < deadline && client.wait_readable(deadline - monotonic)
        chunk = client.read_nonblock(4096, exception: false)
        (eof = true) && break if chunk.nil?
        answer << chunk unless chunk == :wait_readable
      end
      expect(eof).to be(true), "no end of stream after #{answer.inspect}: the new worker holds the connection open"
      expect(answer).to start_with("HTTP/1.1")
    ensure
      client&.close
    end
  end

  it "gives Hyperion.stats Puma's shapes: a single worker's, and in a cluster the worker's own" do
    with_server(app) do |port|
      stats = JSON.parse(http_get(port, "/stats").body)
      expect(stats.keys).to eq(%w[started_at backlog running pool_capacity max_threads requests_count busy_threads])
      expect(stats).to include("busy_threads" => 1, "requests_count" => 1, "max_threads" => 5)
    end
    hook = File.join(dir, "master_stats.json")
    File.write(File.join(dir, "hyperion.rb"), "workers 2\non_booted { File.write(#{hook.inspect}, Hyperion.stats) }\n")
    with_server("-C", File.join(dir, "hyperion.rb"), app) do |port|
      expect(JSON.parse(http_get(port, "/stats").body).keys).to include("busy_threads", "requests_count")
      wait_until(60) { File.exist?(hook) && !File.read(hook).empty? }
      master = JSON.parse(File.read(hook))
      expect(master).to include("workers" => 2, "booted_workers" => 2)
    end
  end
end
