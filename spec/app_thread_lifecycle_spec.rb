# frozen_string_literal: true

require "spec_helper"

# The Ruby threads that run the app must outlive whatever the app or a
# library throws at them (Thread#raise from rack-timeout, a late Timeout),
# end when they are really killed, and be replaced when they do end while the
# worker still serves. A worker must never silently stop answering.
RSpec.describe "app threads" do
  def app_threads
    Thread.list.select { |t| t.name&.start_with?("hyperion-app-") && t.alive? }
  end

  def get(port, path = "/")
    Net::HTTP.start("127.0.0.1", port, read_timeout: 20) { |http| http.get(path) }
  end

  let(:hello) { ->(_env) { [200, {}, ["hello from #{Thread.current.name}"]] } }

  it "survives an exception raised into it while idle and keeps serving" do
    with_worker(hello, thread_count: 1) do |port|
      expect(get(port).code).to eq("200")
      thread = app_threads.first
      thread.raise(RuntimeError, "raised into an idle app thread")
      sleep 0.2
      expect(thread).to be_alive
      response = get(port)
      expect(response.code).to eq("200")
      expect(response.body).to eq("hello from hyperion-app-0")
    end
  end

  it "survives a Timeout-style exception raised into it while the app runs" do
    app = lambda do |env|
      sleep 30 if env["PATH_INFO"] == "/slow"
      [200, {}, ["ok"]]
    end
    with_worker(app, thread_count: 1) do |port|
      slow = Thread.new { get(port, "/slow") }
      wait_until { app_threads.first&.status == "sleep" }
      sleep 0.1
      app_threads.first.raise(Timeout::Error, "request took too long")
      expect(slow.value.code).to eq("500")
      expect(get(port).code).to eq("200")
    end
  end

  it "is replaced when it is killed while the worker serves" do
    with_worker(hello, thread_count: 1) do |port|
      expect(get(port).code).to eq("200")
      killed = app_threads.first
      killed.kill
      killed.join(10)
      expect(killed).not_to be_alive
      response = get(port)
      expect(response.code).to eq("200")
      expect(response.body).to eq("hello from hyperion-app-0")
      expect(app_threads.size).to eq(1)
    end
  end

  # A non-local exit (Thread#kill, process exit) inside code the server calls
  # after the app returned: the body is closed, then the exit goes on and the
  # thread ends (to be replaced), instead of being logged as an exception.
  {
    "body#each" => ->(body) { def body.each = (yield("a"); Thread.current.kill; yield("b")) },
    "body#close" => ->(body) { def body.close = (count_close; Thread.current.kill) },
    "body#to_ary" => ->(body) { def body.to_ary = (Thread.current.kill; ["x"]) },
    "headers#each" => :headers
  }.each do |where, setup|
    it "lets Thread#kill inside #{where} end the thread after closing the body once" do
      closes = Queue.new
      killed = Queue.new
      app = lambda do |env|
        next [200, {}, ["fine"]] unless env["PATH_INFO"] == "/kill"

        killed << Thread.current
        body = Object.new
        body.define_singleton_method(:each) { |&b| b.call("chunk") }
        body.define_singleton_method(:count_close) { closes << :closed }
        body.define_singleton_method(:close) { count_close }
        headers = { "x" => "y" }
        if setup == :headers
          headers = Object.new
          def headers.each = Thread.current.kill
        else
          setup.call(body)
        end
        [200, headers, body]
      end
      with_worker(app, thread_count: 1) do |port|
        # Raw bytes, once: Net::HTTP would retry a GET cut short.
        raw_exchange(port, "GET /kill HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        thread = killed.pop
        thread.join(10)
        expect(thread).not_to be_alive
        expect(closes.pop).to eq(:closed)
        sleep 0.1
        expect(closes.size).to eq(0)
        expect(get(port).code).to eq("200")
      end
    end
  end

  it "stops within one graceful_timeout, then runs the shutdown hooks after the app threads are gone" do
    config = Hyperion::Config.new
    config.graceful_timeout = 2
    hook_saw = Queue.new
    config.on_worker_shutdown << ->(_) { hook_saw << app_threads.size }
    busy = Queue.new
    app = lambda do |_env|
      busy << Thread.current
      sleep 60
      [200, {}, ["late"]]
    end
    listener = TCPServer.new("127.0.0.1", 0)
    port = listener.local_address.ip_port
    worker = Hyperion::Worker.new(host: "127.0.0.1", port: port, app: app, read_timeout: 5, thread_count: 4,
                                  config: config, listener: listener)
    runner = Thread.new { worker.run }
    clients = 4.times.map do
      Thread.new do
        get(port)
      rescue StandardError
        nil
      end
    end
    4.times { busy.pop }
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    worker.stop
    runner.join(30)
    elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
    expect(elapsed).to be < 2 + 3 # one graceful_timeout plus the kill, not 2 s per thread
    expect(hook_saw.pop).to eq(0)
    clients.each { |c| c.join(10) }
  ensure
    listener&.close unless listener&.closed?
  end
end

RSpec.describe "a streamed body whose block other threads call" do
  # The worker runs in a child process: a deadlock there would freeze the
  # whole Ruby VM, this one included.
  it "does not deadlock against a slow client" do
    with_cli(File.join(ServerHelpers::FIXTURES, "shared_block_body.ru"), "-t", "2") do |port|
      slow = TCPSocket.new("127.0.0.1", port)
      slow.write("GET /shared HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      sleep 1.5 # let the stream fill up while nobody reads
      other = raw_exchange(port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", wait: 20)
      expect(other).to start_with("HTTP/1.1 200")
      status, _headers, body = parse_responses(read_all(slow, 60)).first
      expect(status).to eq(200)
      expect(body.bytesize).to eq(2 * 40 * 65_536)
    ensure
      slow&.close
    end
  end
end

RSpec.describe "an app that forks inside a request" do
  it "gets children that exit (they never drop the worker's Rust state) while the worker keeps serving" do
    with_cli(File.join(ServerHelpers::FIXTURES, "forking_app.ru"), "-t", "4") do |port|
      streams = 3.times.map do
        Thread.new { Array.new(20) { raw_exchange(port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") } }
      end
      forks = Array.new(15) { http_get(port, "/fork").body }
      expect(forks.uniq).to eq(["child exited"])
      expect(streams.flat_map(&:value).map { |raw| parse_responses(raw).first.first }.uniq).to eq([200])
    end
  end
end
