# frozen_string_literal: true

require "json"
require "rbconfig"

# A bounded request loop in another process, for "zero failed requests while
# X happens" examples: each request opens a new connection, so every one of
# them meets whatever the server is doing at that moment.
module LoadHelpers
  SCRIPT = <<~RUBY
    require "net/http"
    require "json"
    port, stop_file, path = Integer(ARGV[0]), ARGV[1], ARGV[2]
    codes = Hash.new(0)
    bodies = Hash.new(0)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 90
    $stdout.sync = true
    puts "started"
    until File.exist?(stop_file) || Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
      begin
        response = Net::HTTP.start("127.0.0.1", port, open_timeout: 5, read_timeout: 30) { |h| h.get(path) }
        codes[response.code] += 1
        bodies[response.body] += 1
      rescue StandardError => e
        codes[e.class.name] += 1
      end
    end
    puts JSON.generate("codes" => codes, "bodies" => bodies)
  RUBY

  # Runs the loop while the block runs; returns {"codes" => {...}, "bodies" => {...}}.
  def under_load(port, path: "/")
    stop = File.join(Dir.mktmpdir("hyperion-load"), "stop")
    reader, writer = IO.pipe
    pid = Process.spawn(RbConfig.ruby, "-e", SCRIPT, port.to_s, stop, path, out: writer)
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
