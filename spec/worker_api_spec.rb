# frozen_string_literal: true

require "spec_helper"

RSpec.describe Hyperion::Worker do
  let(:app) { ->(_env) { [200, {}, ["ok"]] } }
  let(:required) { { host: "127.0.0.1", port: 0, app: app, read_timeout: 5 } }

  describe ".new" do
    it "accepts every keyword of the seed API" do
      expect do
        described_class.new(**required, tls: nil, thread_count: 3, config: Hyperion::Config.new, worker_index: 2,
                                        listener: nil, max_pending: 10, max_request_read_seconds: 30,
                                        h2_settings: { max_concurrent_streams: 50 }, async_io: true)
      end.not_to raise_error
    end

    it "names an unknown keyword" do
      expect { described_class.new(**required, threads: 5) }.to raise_error(ArgumentError, /threads/)
    end

    it "names a missing keyword" do
      expect { described_class.new(host: "127.0.0.1", port: 0, app: app) }
        .to raise_error(ArgumentError, /read_timeout/)
    end

    {
      port: ["80", TypeError, /port: expected an Integer, got String/],
      host: [1, TypeError, /host: expected a String/],
      thread_count: [0, ArgumentError, /thread_count: must be between 1/],
      read_timeout: ["5", TypeError, /read_timeout: expected a number of seconds/],
      max_pending: [-1, ArgumentError, /max_pending/],
      max_request_read_seconds: [0, ArgumentError, /max_request_read_seconds/],
      max_connections: [0, ArgumentError, /max_connections: must be between 1 and/],
      app: [Object.new, TypeError, /app: expected an object that responds to #call/],
      listener: ["fd", TypeError, /listener: expected a TCPServer or UNIXServer/],
      async_io: ["yes", TypeError, /async_io/],
      tls: [{ cert: "c.pem" }, ArgumentError, /tls: :key is missing/],
      h2_settings: [{ max_frame_size: 10 }, ArgumentError, /h2_settings: max_frame_size must be between 16384/],
      log_requests: ["yes", TypeError, /log_requests: expected true, false or nil/],
      log_format: [:xml, ArgumentError, /log_format: must be :text or :json, got "xml"/],
      drain_delay: [-1, ArgumentError, /drain_delay: must be a number of seconds, 0 or more/],
      control: [{ auth_token: "t" }, ArgumentError, /control: :listener is missing/],
      stats: ["page", TypeError, /stats: expected a Hyperion::StatsPage, got String/]
    }.each do |key, (value, error, message)|
      it "rejects a bad #{key} with #{error} naming the key" do
        expect { described_class.new(**required, key => value) }.to raise_error(error, message)
      end
    end

    it "refuses a TCP control listener without a token, and unknown control keys" do
      tcp = TCPServer.new("127.0.0.1", 0)
      expect { described_class.new(**required, control: { listener: tcp }) }
        .to raise_error(ArgumentError, /control: a TCP control listener needs auth_token:/)
      expect { described_class.new(**required, control: { listener: tcp, auth_token: "" }) }
        .to raise_error(ArgumentError, /needs auth_token:/)
      expect { described_class.new(**required, control: { listener: tcp, auth_token: "t", tokn: 1 }) }
        .to raise_error(ArgumentError, /control: unknown key :tokn/)
      expect { described_class.new(**required, control: { listener: tcp, auth_token: "t", handler: 5 }) }
        .to raise_error(TypeError, /control: handler: expected an object that responds to #call/)
      expect { described_class.new(**required, control: { listener: tcp, auth_token: "t" }, log_format: "json") }
        .not_to raise_error
    ensure
      tcp&.close
    end

    it "rejects an unknown tls or h2 setting by name" do
      expect { described_class.new(**required, tls: { cert: "a", key: "b", ciphers: "c" }) }
        .to raise_error(ArgumentError, /tls: unknown key :ciphers/)
      expect { described_class.new(**required, tls: { cert: "a", key: "b", verify_mode: :peer }) }
        .to raise_error(ArgumentError, /tls: verify_mode needs :ca/)
      expect { described_class.new(**required, tls: { self_signed: true, cert: "a" }) }
        .to raise_error(ArgumentError, /either :cert and :key, or self_signed/)
      expect { described_class.new(**required, h2_settings: { bogus: 1 }) }
        .to raise_error(ArgumentError, /unknown setting "bogus"/)
    end
  end

  describe "#run" do
    it "calls boot hooks (index, in order) before serving and shutdown hooks when the loop exits" do
      events = Queue.new
      config = Hyperion::Config.new
      config.on_worker_boot << ->(i) { events << [:boot1, i] }
      config.on_worker_boot << ->(i) { events << [:boot2, i] }
      config.on_worker_shutdown << ->(i) { events << [:shutdown1, i] }
      config.on_worker_shutdown << ->(i) { events << [:shutdown2, i] }
      serving = ->(_env) { events << [:request, nil]; [200, {}, ["ok"]] }
      with_worker(serving, config: config, worker_index: 3) do |port|
        expect(http_get(port).body).to eq("ok")
      end
      expect(Array.new(events.size) { events.pop })
        .to eq([[:boot1, 3], [:boot2, 3], [:request, nil], [:shutdown1, 3], [:shutdown2, 3]])
    end

    it "runs the shutdown hooks even when one of them raises" do
      ran = []
      config = Hyperion::Config.new
      config.on_worker_shutdown << ->(_) { raise "hook failure" }
      config.on_worker_shutdown << ->(i) { ran << i }
      with_worker(app, config: config) { |port| http_get(port) }
      expect(ran).to eq([0])
    end

    it "raises a boot hook's exception and does not serve" do
      config = Hyperion::Config.new
      config.on_worker_boot << ->(_) { raise ArgumentError, "no database" }
      worker = described_class.new(**required, config: config)
      expect { worker.run }.to raise_error(ArgumentError, "no database")
    end

    it "binds its own SO_REUSEPORT socket without a listener, so two workers share a port" do
      probe = TCPServer.new("127.0.0.1", 0)
      port = probe.local_address.ip_port
      probe.close
      workers = 2.times.map do |i|
        described_class.new(host: "127.0.0.1", port: port, app: ->(_) { [200, {}, ["w#{i}"]] }, read_timeout: 5)
      end
      threads = workers.map { |w| Thread.new { w.run } }
      bodies = Array.new(40) do
        Timeout.timeout(5) do
          begin
            http_get(port).body
          rescue Errno::ECONNREFUSED
            sleep 0.05
            retry
          end
        end
      end
      expect(bodies.uniq.sort).to eq(%w[w0 w1]).or eq(%w[w0]).or eq(%w[w1])
      expect(bodies.size).to eq(40)
    ensure
      workers&.each(&:stop)
      threads&.each { |t| t.join(5) }
    end

    it "raises BindError naming the address when the port is taken" do
      taken = TCPServer.new("127.0.0.1", 0)
      port = taken.local_address.ip_port
      worker = described_class.new(**required, port: port)
      expect { worker.run }.to raise_error(Hyperion::BindError, /could not bind 127\.0\.0\.1:#{port}: address already in use/)
    ensure
      taken&.close
    end

    it "adopts a UNIXServer listener" do
      path = File.join(Dir.mktmpdir("hyperion"), "s.sock")
      listener = UNIXServer.new(path)
      with_worker(->(env) { [200, {}, [env["REMOTE_ADDR"]]] }, listener: listener) do
        socket = UNIXSocket.new(path)
        socket.write("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = read_all(socket, 5)
        expect(response).to start_with("HTTP/1.1 200")
        expect(response).to end_with("127.0.0.1")
      end
    end

    it "refuses a listener that is not listening" do
      socket = Socket.new(:INET, :STREAM)
      worker = described_class.new(**required, listener: socket)
      expect { worker.run }.to raise_error(Hyperion::Error, /not listening/)
    ensure
      socket&.close
    end

    it "can only run once" do
      worker = nil
      with_worker(app) do |_port, w|
        worker = w
      end
      expect { worker.run }.to raise_error(Hyperion::Error, /already called/)
    end

    it "stops when #stop is called before #run" do
      worker = described_class.new(**required)
      worker.stop
      expect { Timeout.timeout(5) { worker.run } }.not_to raise_error
    end

    it "lets Thread#kill end an idle app thread at once" do
      with_worker(app, thread_count: 2) do |port|
        http_get(port)
        app_thread = Thread.list.find { |t| t.name == "hyperion-app-0" }
        expect(app_thread).not_to be_nil
        app_thread.kill
        expect(app_thread.join(1)).to eq(app_thread)
        expect(http_get(port).body).to eq("ok") # the other thread keeps serving
      end
    end

    it "does not hang process exit while the worker runs in a background thread" do
      script = <<~RUBY
        require "hyperion"
        worker = Hyperion::Worker.new(host: "127.0.0.1", port: 0, app: ->(_) { [200, {}, []] },
                                      read_timeout: 5, thread_count: 4)
        Thread.new { worker.run }
        sleep 0.3
        exit 0
      RUBY
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      out, status = run_ruby(script, env: { "HYPERION_LOG" => "off" })
      expect(status.exitstatus).to eq(0), out
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be < 3
    end

    it "checks tls: files when it runs, before binding" do
      worker = described_class.new(**required, tls: { cert: "/nonexistent/c.pem", key: "/nonexistent/k.pem" })
      expect { worker.run }.to raise_error(Hyperion::TLSError, %r{cannot read the TLS certificate /nonexistent/c.pem})
    end
  end
end
