# frozen_string_literal: true

require "spec_helper"

# async_io: each request runs in a fiber of its own, so requests that wait
# (sleep, sockets, Net::HTTP, Queue#pop, Mutex, Timeout) share one thread.
# Every example runs one app thread (thread_count: 1 / -t 1) and proves the
# concurrency causally: the waiting requests can only finish once the test
# releases them, and the test releases them only after something else was
# answered. In thread mode those examples would never get that far.
RSpec.describe "async_io", timeout: 120 do
  def get(port, path = "/")
    Net::HTTP.start("127.0.0.1", port, read_timeout: 60, max_retries: 0) { |http| http.get(path) }
  end

  # Pops `count` items from `queue`, failing (instead of hanging) after a
  # generous while.
  def take(queue, count, within: 60)
    Timeout.timeout(within) { Array.new(count) { queue.pop } }
  rescue Timeout::Error
    raise "only #{queue.size} of #{count} waited on at once: the requests did not run concurrently"
  end

  def app_threads
    Thread.list.select { |t| t.name&.start_with?("hyperion-app-") && t.alive? }
  end

  it "runs a sleep, a slow socket read, a Net::HTTP call and a Queue#pop at once on one thread, and answers meanwhile" do
    released = Queue.new # closed to release every waiting request
    waiting = Queue.new
    slow_server = TCPServer.new("127.0.0.1", 0)
    slow_port = slow_server.local_address.ip_port
    slow_writer = Thread.new do
      client = slow_server.accept
      released.pop
      client.write("slow data")
      client.close
    end
    upstream = ->(_env) { released.pop; [200, {}, ["from upstream"]] }
    with_worker(upstream, thread_count: 1) do |upstream_port|
      app = lambda do |env|
        case env["PATH_INFO"]
        when "/sleep"
          waiting << :sleep
          sleep 0.01 until released.closed?
          [200, {}, ["slept"]]
        when "/read"
          socket = TCPSocket.new("127.0.0.1", slow_port)
          waiting << :read
          [200, {}, [socket.read]]
        when "/http"
          waiting << :http
          [200, {}, [Net::HTTP.get(URI("http://127.0.0.1:#{upstream_port}/"))]]
        when "/queue"
          items = Queue.new
          Fiber.schedule do
            sleep 0.01 until released.closed?
            items << "produced by a fiber"
          end
          waiting << :queue
          [200, {}, [items.pop]]
        else
          [200, {}, ["hello from #{Thread.current.name}"]]
        end
      end
      with_worker(app, thread_count: 1, async_io: true) do |port|
        slow = %w[/sleep /read /http /queue].to_h { |path| [path, Thread.new { get(port, path) }] }
        expect(take(waiting, 4)).to contain_exactly(:sleep, :read, :http, :queue)
        hello = get(port, "/")
        expect(hello.body).to eq("hello from hyperion-app-0")
        # None of them can finish before the release below.
        expect(slow.values).to all(be_alive)
        released.close
        expect(slow.transform_values { |t| [t.value.code, t.value.body] }).to eq(
          "/sleep" => %w[200 slept], "/read" => ["200", "slow data"],
          "/http" => ["200", "from upstream"], "/queue" => ["200", "produced by a fiber"]
        )
      end
    end
    slow_writer.join(10)
  ensure
    slow_server&.close
  end

  it "overlaps plain sleeps on one thread: every sleeper starts before any wakes, and hello answers meanwhile" do
    events = Queue.new
    app = lambda do |env|
      next [200, {}, ["hello"]] unless env["PATH_INFO"] == "/sleep"

      events << :asleep
      sleep 3
      events << :awake
      [200, {}, ["slept"]]
    end
    with_worker(app, thread_count: 1, async_io: true) do |port|
      sleepers = Array.new(3) { Thread.new { get(port, "/sleep") } }
      # In thread mode the second sleeper would start only after the first woke.
      expect(take(events, 3)).to eq(%i[asleep asleep asleep])
      expect(get(port, "/").body).to eq("hello")
      expect(events).to be_empty # answered while all three still slept
      expect(sleepers.map { |t| t.value.body }).to eq(%w[slept slept slept])
      expect(take(events, 3)).to eq(%i[awake awake awake])
    end
  end

  it "waits for a child process, a thread and a name lookup in the fiber only" do
    Dir.mktmpdir do |dir|
      gate = File.join(dir, "open")
      waiting = Queue.new
      app = lambda do |env|
        case env["PATH_INFO"]
        when "/child"
          pid = Process.spawn(RbConfig.ruby, "-e", "sleep 0.01 until File.exist?(#{gate.inspect}); exit 3")
          waiting << :child
          _, status = Process.wait2(pid)
          [200, {}, ["child exited #{status.exitstatus}"]]
        when "/join"
          helper = Thread.new { sleep 0.01 until File.exist?(gate); :joined }
          waiting << :join
          [200, {}, [helper.value.to_s]]
        when "/resolve"
          [200, {}, [Addrinfo.getaddrinfo("localhost", 80, :INET, :STREAM).map(&:ip_address).uniq.join(",")]]
        else [200, {}, ["hello"]]
        end
      end
      with_worker(app, thread_count: 1, async_io: true) do |port|
        child = Thread.new { get(port, "/child") }
        joiner = Thread.new { get(port, "/join") }
        expect(take(waiting, 2)).to contain_exactly(:child, :join)
        expect(get(port, "/resolve").body).to eq("127.0.0.1")
        expect(get(port, "/").body).to eq("hello")
        expect([child, joiner]).to all(be_alive)
        File.write(gate, "")
        expect(child.value.body).to eq("child exited 3")
        expect(joiner.value.body).to eq("joined")
      end
    end
  end

  it "turns an exception in one fiber into a 500 for that request only" do
    released = Queue.new
    waiting = Queue.new
    app = lambda do |env|
      raise "only this request fails" if env["PATH_INFO"] == "/raise"

      waiting << :in
      released.pop
      [200, {}, ["finished"]]
    end
    with_worker(app, thread_count: 1, async_io: true) do |port|
      others = Array.new(3) { Thread.new { get(port, "/wait") } }
      take(waiting, 3)
      expect(get(port, "/raise").code).to eq("500")
      expect(others).to all(be_alive)
      3.times { released << :go }
      expect(others.map { |t| [t.value.code, t.value.body] }).to all(eq(%w[200 finished]))
    end
  end

  it "lets Timeout.timeout interrupt a waiting fiber and Mutex#lock wait without blocking the thread" do
    released = Queue.new
    waiting = Queue.new
    lock = Mutex.new
    app = lambda do |env|
      case env["PATH_INFO"]
      when "/timeout"
        begin
          Timeout.timeout(0.05) { released.pop }
          [200, {}, ["not timed out"]]
        rescue Timeout::Error => e
          [200, {}, ["#{e.class}: #{e.message}"]]
        end
      when "/hold"
        lock.synchronize do
          waiting << :holding
          sleep 0.01 until released.closed?
        end
        [200, {}, ["held"]]
      when "/lock"
        waiting << :locking
        lock.synchronize { [200, {}, ["locked after the holder"]] }
      else
        [200, {}, ["hello"]]
      end
    end
    with_worker(app, thread_count: 1, async_io: true) do |port|
      holder = Thread.new { get(port, "/hold") }
      take(waiting, 1)
      locker = Thread.new { get(port, "/lock") }
      take(waiting, 1)
      expect(get(port, "/timeout").body).to eq("Timeout::Error: execution expired")
      expect(get(port, "/").body).to eq("hello")
      expect([holder, locker]).to all(be_alive)
      released.close
      expect(holder.value.body).to eq("held")
      expect(locker.value.body).to eq("locked after the holder")
    end
  end

  it "keeps serving while a streamed response waits for a client that does not read" do
    streamed = Queue.new
    chunk = "x" * (1 << 20)
    app = lambda do |env|
      next [200, {}, ["hello"]] unless env["PATH_INFO"] == "/stream"

      body = Enumerator.new do |y|
        64.times { |i| y << chunk; streamed << i }
        streamed << :done
      end
      [200, {}, body]
    end
    with_worker(app, thread_count: 1, async_io: true) do |port|
      reader = TCPSocket.new("127.0.0.1", port)
      reader.write("GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
      take(streamed, 1)
      expect(get(port, "/").body).to eq("hello")
      sent = []
      sent << streamed.pop until streamed.empty?
      expect(sent).not_to include(:done) # 64 MiB cannot all be buffered: the fiber still waits
      # Once the client reads, the rest goes out and the fiber finishes.
      received = 0
      received += reader.readpartial(1 << 20).bytesize while received < 64 << 20
      Timeout.timeout(60) { nil until streamed.pop == :done }
    ensure
      reader&.close
    end
  end

  it "waits in the queue beyond max_fibers, where max_pending answers 503" do
    released = Queue.new
    waiting = Queue.new
    app = lambda do |env|
      next [200, {}, ["hello"]] if env["PATH_INFO"] == "/"

      waiting << :in
      released.pop
      [200, {}, ["released"]]
    end
    with_worker(app, thread_count: 1, async_io: true, max_fibers: 2, max_pending: 1) do |port|
      # One at a time: with max_pending 1, two arriving before the thread
      # took the first would leave the second to a 503.
      busy = Array.new(2) do
        Thread.new { get(port, "/wait") }.tap { take(waiting, 1) }
      end
      # Both fibers are taken: one of these waits in the queue, the other
      # finds it full.
      queued = Array.new(2) { Thread.new { get(port, "/") } }
      codes = Queue.new
      queued.each { |t| Thread.new { codes << t.value.code } }
      expect(take(codes, 1)).to eq(["503"])
      expect(waiting).to be_empty
      2.times { released << :go }
      expect(busy.map { |t| t.value.body }).to all(eq("released"))
      expect(take(codes, 1)).to eq(["200"])
    end
  end

  describe "interrupts" do
    let(:ended) { Queue.new }
    let(:waiting) { Queue.new }
    let(:app) do
      ended = self.ended
      waiting = self.waiting
      lambda do |env|
        case env["PATH_INFO"]
        when "/wait"
          begin
            waiting << :in
            sleep 60
            [200, {}, ["not interrupted"]]
          ensure
            ended << :ensure_ran
          end
        when "/kill" then Thread.current.kill
        else [200, {}, ["hello from #{Thread.current.name}"]]
        end
      end
    end

    it "answers 500 for every waiting request when the app thread is killed, which is replaced" do
      with_worker(app, thread_count: 1, async_io: true) do |port|
        waiters = Array.new(3) { Thread.new { get(port, "/wait") } }
        take(waiting, 3)
        killed = app_threads.first
        killed.kill
        expect(killed.join(20)).to eq(killed)
        expect(waiters.map { |t| t.value.code }).to all(eq("500"))
        expect(take(ended, 3)).to all(eq(:ensure_ran))
        expect(get(port, "/").body).to eq("hello from hyperion-app-0")
        expect(app_threads.size).to eq(1)
      end
    end

    it "ends the other fibers too when a request kills its own thread" do
      with_worker(app, thread_count: 1, async_io: true) do |port|
        waiters = Array.new(2) { Thread.new { get(port, "/wait") } }
        take(waiting, 2)
        expect(raw_exchange(port, "GET /kill HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
          .to start_with("HTTP/1.1 500")
        expect(waiters.map { |t| t.value.code }).to all(eq("500"))
        expect(get(port, "/").body).to eq("hello from hyperion-app-0")
      end
    end

    it "drains fibers in flight on TERM: each finishes its request, then the process exits 0" do
      Dir.mktmpdir do |dir|
        entered = File.join(dir, "entered")
        rackup = File.join(dir, "config.ru")
        File.write(rackup, <<~RUBY)
          run lambda { |env|
            next [200, {}, ["hello"]] unless env["PATH_INFO"] == "/slow"

            File.open(#{entered.inspect}, "a") { |f| f.puts(env["QUERY_STRING"]) }
            sleep 1
            [200, {}, ["finished " + env["QUERY_STRING"]]]
          }
        RUBY
        with_cli(rackup, "-t", "1", "--async-io") do |port, pid|
          slow = Array.new(5) { |i| Thread.new { get(port, "/slow?#{i}") } }
          Timeout.timeout(60) { sleep 0.02 until File.exist?(entered) && File.readlines(entered).size == 5 }
          Process.kill("TERM", pid)
          expect(slow.map { |t| t.value.body }).to eq(Array.new(5) { |i| "finished #{i}" })
          _, status = Timeout.timeout(30) { Process.wait2(pid) }
          expect(status.exitstatus).to eq(0)
        end
      end
    end
  end

  it "serves a Rails 6.1 app, many requests at once on one thread, each with its own CurrentAttributes" do
    gate = File.join(Dir.mktmpdir("hyperion-gate"), "open")
    with_cli(File.join(ServerHelpers::FIXTURES, "rails_app.ru"), "-t", "1", "--async-io",
             env: { "HYPERION_SPEC_GATE" => gate }) do |port|
      expect(get(port, "/").body).to eq("Hello, World!")
      users = Array.new(20) { |i| Thread.new { get(port, "/users/#{i}") } }
      expect(users.map { |t| JSON.parse(t.value.body) })
        .to eq(Array.new(20) { |i| { "id" => i, "name" => "user#{i}", "tags" => %w[a b c] } })
      # An action that waits (as a query would) does not hold the others up:
      # it waits for the gate, which opens only after they were answered.
      slow = Thread.new { get(port, "/slow") }
      expect(get(port, "/users/7").code).to eq("200")
      expect(slow).to be_alive
      File.write(gate, "")
      expect(slow.value.body).to eq("slow")
    end
  end

  # `rake gc_stress` runs this with GC.stress on (and then with compaction):
  # fibers suspended in every kind of wait must stay marked, and so must the
  # scheduler's deadlines and the futures' outputs.
  it "suspends and resumes fibers under GC.stress", :gc_stress, timeout: 600 do
    app = lambda do |env|
      compact_here
      case env["PATH_INFO"]
      when "/sleep"
        sleep 0.01
        compact_here
        [200, {}, ["slept"]]
      when "/queue"
        items = Queue.new
        Fiber.schedule do
          sleep 0.01
          compact_here
          items << "produced"
        end
        [200, {}, [items.pop]]
      when "/pipe"
        reader, writer = IO.pipe
        Fiber.schedule do
          sleep 0.01
          writer.write("piped")
          writer.close
        end
        [200, {}, [reader.read]].tap { reader.close }
      when "/timeout"
        Timeout.timeout(0.01, ArgumentError, "deadline passed") { sleep 30 }
      when "/raise" then raise "under stress"
      when "/stream"
        [200, {}, Enumerator.new { |y| %w[s t r e a m].each { |c| sleep 0.001; compact_here; y << c } }]
      else [200, {}, [env["rack.input"].read]]
      end
    rescue ArgumentError => e
      [200, {}, [e.message]]
    end
    with_worker(app, thread_count: 1, async_io: true) do |port|
      url = "http://127.0.0.1:#{port}"
      gc_stress do
        paths = %w[/sleep /sleep /queue /pipe /timeout /stream]
        bodies = paths.map { |path| Thread.new { curl_get(url + path) } }.map(&:value)
        expect(bodies).to eq(["slept", "slept", "produced", "piped", "deadline passed", "stream"])
        failed = Open3.capture2("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "300",
                                "#{url}/raise").first
        expect(failed).to eq("500")
        echoed = Open3.capture2("curl", "-s", "--max-time", "300", "--data-binary", "posted", "#{url}/echo").first
        expect(echoed).to eq("posted")
      end
    end
  end

  describe "configuration" do
    it "is set by --async-io, `async_io` in config/hyperion.rb and Worker.new(async_io: true); max_fibers is checked" do
      rackup = <<~RUBY
        run lambda { |env| [200, {}, [(Fiber.scheduler ? "fiber " : "thread ") + env["rack.multithread"].to_s]] }
      RUBY
      Dir.mktmpdir do |dir|
        File.write(File.join(dir, "config.ru"), rackup)
        with_cli("config.ru", "-t", "1", "--async-io", chdir: dir) { |port| expect(get(port).body).to eq("fiber true") }
        with_cli("config.ru", "-t", "1", chdir: dir) { |port| expect(get(port).body).to eq("thread false") }
        FileUtils.mkdir_p(File.join(dir, "config"))
        File.write(File.join(dir, "config/hyperion.rb"), "async_io\nmax_fibers 50\nthreads 1\n")
        with_cli("config.ru", chdir: dir) { |port| expect(get(port).body).to eq("fiber true") }
        File.write(File.join(dir, "config/hyperion.rb"), "async_io :yes\n")
        out, status = Open3.capture2e(RbConfig.ruby, ServerHelpers::HYPERION, "--check", chdir: dir)
        expect(status.exitstatus).to eq(1)
        expect(out).to match(%r{config/hyperion.rb:1: async_io expects true or false, got :yes})
        File.write(File.join(dir, "config/hyperion.rb"), "")
        out, = Open3.capture2e(RbConfig.ruby, ServerHelpers::HYPERION, "--check", "--max-fibers", "0", chdir: dir)
        expect(out.lines.last).to match(/--max-fibers: must be between 1 and 1000000, got 0/)
      end
      expect { Hyperion::Worker.new(host: "127.0.0.1", port: 0, app: ->(_) {}, read_timeout: 5, max_fibers: "many") }
        .to raise_error(TypeError, /max_fibers: expected an Integer/)
    end

    it "leaves thread mode as it was without async_io" do
      app = ->(_env) { [200, {}, [Fiber.scheduler.inspect]] }
      [{}, { async_io: false }, { async_io: nil }].each do |options|
        with_worker(app, thread_count: 1, **options) { |port| expect(get(port).body).to eq("nil") }
      end
    end
  end
end
