# frozen_string_literal: true

require "open3"
require "rbconfig"

# Starts real servers on free ports and talks to them over real sockets.
module ServerHelpers
  ROOT = File.expand_path("../..", __dir__)
  HYPERION = File.join(ROOT, "bin/hyperion")
  FIXTURES = File.join(ROOT, "spec/fixtures")

  # The read timeout of in-process workers: short, except under GC.stress,
  # where a client inside the stressed process may take many seconds to send
  # a request head. A test must not depend on the machine's speed.
  def spec_read_timeout = gc_stressed? ? 600 : 5

  def gc_stressed? = ENV["HYPERION_GC_STRESS"] == "1"

  # Runs a Hyperion::Worker in a thread on a free 127.0.0.1 port and yields
  # the port; stops it afterwards. Returns whatever the block returns.
  def with_worker(app, thread_count: 2, config: nil, **options)
    listener = options.delete(:listener) || TCPServer.new("127.0.0.1", 0)
    port = listener.respond_to?(:local_address) && listener.local_address.ip? ? listener.local_address.ip_port : 0
    read_timeout = options.delete(:read_timeout) || spec_read_timeout
    worker = Hyperion::Worker.new(host: "127.0.0.1", port: port, app: app, read_timeout: read_timeout,
                                  thread_count: thread_count, config: config, listener: listener, **options)
    runner = Thread.new { worker.run }
    runner.report_on_exception = false
    yield port, worker
  ensure
    worker&.stop
    runner&.join(10) || raise("worker did not stop within 10 s")
    listener&.close unless listener&.closed?
  end

  # Sends raw bytes and returns everything the server wrote until it closed
  # the connection (or `wait` seconds passed; far longer under GC.stress,
  # where the in-process server may take minutes on a loaded machine).
  def raw_exchange(port, bytes, wait: gc_stressed? ? 120 : 5)
    socket = TCPSocket.new("127.0.0.1", port)
    socket.write(bytes)
    read_all(socket, wait)
  ensure
    socket&.close
  end

  def read_all(socket, wait)
    out = +""
    deadline = Time.now + wait
    loop do
      remaining = deadline - Time.now
      break if remaining <= 0 || !socket.wait_readable(remaining)

      chunk = socket.read_nonblock(65_536, exception: false)
      break if chunk.nil?
      next if chunk == :wait_readable

      out << chunk
    end
    out
  end

  def http_get(port, path = "/", headers = {})
    Net::HTTP.start("127.0.0.1", port, read_timeout: 10) { |http| http.get(path, headers) }
  end

  def http_post(port, path, body, headers = {})
    Net::HTTP.start("127.0.0.1", port, read_timeout: 10) { |http| http.post(path, body, headers) }
  end

  # Splits raw HTTP/1.1 responses (as read off one connection) into
  # [status, headers_hash, body] triples. Understands content-length and
  # chunked bodies.
  def parse_responses(raw)
    responses = []
    rest = raw.b
    until rest.empty?
      head, rest = rest.split("\r\n\r\n", 2)
      lines = head.split("\r\n")
      status = lines.shift[/\AHTTP\/1\.[01] (\d{3})/, 1].to_i
      headers = lines.each_with_object({}) { |l, h| k, v = l.split(":", 2); (h[k.downcase] ||= []) << v.strip }
      rest ||= ""
      if headers["content-length"]
        length = headers["content-length"].first.to_i
        body = rest[0, length]
        rest = rest[length..] || ""
      elsif headers["transfer-encoding"]&.include?("chunked")
        body = +""
        loop do
          size_line, rest = rest.split("\r\n", 2)
          size = size_line.to_i(16)
          if size.zero?
            rest = rest.sub(/\A\r\n/, "")
            break
          end
          body << rest[0, size]
          rest = rest[(size + 2)..] || ""
        end
      else
        body = rest
        rest = ""
      end
      responses << [status, headers, body]
    end
    responses
  end

  # Starts `bin/hyperion ARGS` on a free port; yields [port, pid, log_path].
  # The log file holds stdout and stderr. Stops the server (TERM) afterwards.
  # `bind: false` leaves -b/-p out (the config file or the args choose).
  def with_cli(*args, env: {}, chdir: ROOT, bind: true)
    log = File.join(Dir.mktmpdir("hyperion-log"), "server.log")
    bind_args = bind ? ["-b", "127.0.0.1", "-p", "0"] : []
    pid = Process.spawn({ "HYPERION_LOG" => "info" }.merge(env), RbConfig.ruby, HYPERION, *bind_args, *args,
                        [:out, :err] => [log, "w"], chdir: chdir)
    port = wait_for_listening(log, pid)
    yield port, pid, log
  ensure
    if pid
      begin
        Process.kill("TERM", pid)
        Timeout.timeout(10) { Process.wait(pid) }
      rescue Errno::ESRCH, Errno::ECHILD
        nil
      end
    end
  end

  def wait_for_listening(log, pid, timeout: 30)
    deadline = Time.now + timeout
    until Time.now > deadline
      text = File.exist?(log) ? File.read(log) : ""
      return Integer(Regexp.last_match(1)) if text =~ %r{listening on https?://[^\s]+:(\d+)}
      return 0 if text.include?("listening on unix://")
      raise "server exited before listening:\n#{text}" if Process.waitpid(pid, Process::WNOHANG)

      sleep 0.05
    end
    raise "server did not print its listening line within #{timeout} s:\n#{File.read(log)}"
  end

  # Runs a Ruby script in a child process; returns [stdout+stderr, status].
  def run_ruby(script, *args, env: {})
    Open3.capture2e(env, RbConfig.ruby, "-I", File.join(ROOT, "lib"), "-e", script, *args)
  end

  # With HYPERION_GC_STRESS=1 (rake gc_stress), runs the block under
  # GC.stress, so an object Rust holds without marking it is collected.
  #
  # With HYPERION_GC_COMPACT=1 as well (the second pass), GC.auto_compact is
  # on and objects move, so an object Rust keeps where the GC cannot update
  # it is caught; references are verified after the block. Compacting on
  # every stressed GC of a whole request takes minutes per request, so only
  # blocks that ask for it (`compact_every_gc: true`: building Workers from
  # option Hashes) keep GC.stress on in this pass; the apps instead call
  # `compact_here` at the points where Rust holds references mid-request.
  def gc_stress(compact_every_gc: false)
    return yield unless gc_stressed?

    GC.auto_compact = true if gc_compacting?
    GC.stress = true if !gc_compacting? || compact_every_gc
    begin
      yield
    ensure
      GC.stress = false
      if gc_compacting?
        GC.auto_compact = false
        verify_compaction
      end
    end
  end

  def gc_compacting? = gc_stressed? && ENV["HYPERION_GC_COMPACT"] == "1"

  # In the compaction pass, moves every movable object now and verifies the
  # references: apps call it where the server holds Ruby objects.
  def compact_here
    verify_compaction if gc_compacting?
  end

  # Moves every movable object (toward the emptiest pages) and verifies the
  # references. No `double_heap`: the pass keeps every heap page
  # (RUBY_GC_HEAP_FREE_SLOTS_MAX_RATIO=1.0, see spec_helper.rb), so doubling
  # would double the heap on every call; the kept pages leave room enough
  # for every object to move.
  def verify_compaction
    GC.verify_compaction_references(toward: :empty)
  end

  # GET over plain HTTP with curl: a client outside this process, unaffected
  # by GC.stress here. Returns the body.
  def curl_get(url)
    out, status = Open3.capture2("curl", "-sS", "--max-time", "300", url)
    raise "curl #{url} failed: #{status.inspect}" unless status.success?

    out
  end
end
