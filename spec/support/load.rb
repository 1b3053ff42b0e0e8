# frozen_string_literal: true

require "json"
require "rbconfig"

# A bounded request loop in another process, for "zero failed requests while
# X happens" examples: each request opens a new connection, so every one of
# them meets whatever the server is doing at that moment. With `keep_alive:`
# the requests go one after another over one connection instead, a new one
# only after the server said `connection: close` (never a retry: Net::HTTP's
# own retry of idempotent requests is off, so a request lost to a close
# counts as an error).
module LoadHelpers
  SCRIPT = <<~RUBY
    require "net/http"
    require "json"
    port, stop_file, path, keep_alive = Integer(ARGV[0]), ARGV[1], ARGV[2], ARGV[3] == "keep-alive"
    codes = Hash.new(0)
    bodies = Hash.new(0)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 90
    $stdout.sync = true
    puts "started"
    http = nil
    until File.exist?(stop_file) || Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
      begin
        response =
          if keep_alive
            http ||= Net::HTTP.new("127.0.0.1", port).tap do |h|
              h.open_timeout = 5
              h.read_timeout = 30
              h.max_retries = 0
              h.start
            end
            http.get(path)
          else
            Net::HTTP.start("127.0.0.1", port, open_timeout: 5, read_timeout: 30) { |h| h.get(path) }
          end
        codes[response.code] += 1
        bodies[response.body] += 1
      rescue StandardError => e
        codes[e.class.name] += 1
        http = nil
      end
    end
    puts JSON.generate("codes" => codes, "bodies" => bodies)
  RUBY

  # Runs the loop while the block runs; returns {"codes" => {...}, "bodies" => {...}}.
  def under_load(port, path: "/", keep_alive: false)
    stop = File.join(Dir.mktmpdir("hyperion-load"), "stop")
    reader, writer = IO.pipe
    pid = Process.spawn(RbConfig.ruby, "-e", SCRIPT, port.to_s, stop, path, keep_alive ? "keep-alive" : "new",
                        out: writer)
    writer.close
    Timeout.timeout(30) { reader.gets }
    sleep 0.3 # some requests before the event
    yield
    sleep 0.3 # and some after it
    File.write(stop, "")
    Timeout.timeout(120) { Process.wait(pid) }
    pid = nil
    JSON.parse(reader.read)
  ensure
    if pid
      Process.kill("KILL", pid)
      Process.wait(pid)
    end
    reader&.close
  end
end
