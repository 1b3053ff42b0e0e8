# frozen_string_literal: true

require "json"
require "open3"
require "socket"

# For the operations specs (access log, control listener, drain delay):
# bin/hyperion with stdout and stderr apart, raw requests to a control
# listener, and Prometheus text parsed by the official client's parser.
module OpsHelpers
  PROMETHEUS_PARSE = File.join(__dir__, "prometheus_parse.py")

  # Starts `bin/hyperion ARGS` (-b 127.0.0.1 -p 0 first) with stdout and
  # stderr in files of their own; yields [port, pid, stdout_path,
  # stderr_path] and TERMs it afterwards unless it has exited.
  def with_server(*args, env: {}, chdir: ServerHelpers::ROOT)
    dir = Dir.mktmpdir("hyperion-ops")
    out = File.join(dir, "stdout")
    err = File.join(dir, "stderr")
    pid = Process.spawn({ "HYPERION_LOG" => "info" }.merge(env), RbConfig.ruby, ServerHelpers::HYPERION,
                        "-b", "127.0.0.1", "-p", "0", *args, out: [out, "w"], err: [err, "w"], chdir: chdir)
    port = wait_for_port(out, err, pid)
    yield port, pid, out, err
  ensure
    stop_server(pid) if pid
  end

  def stop_server(pid)
    Process.kill("TERM", pid)
    Timeout.timeout(30) { Process.wait(pid) }
  rescue Errno::ESRCH, Errno::ECHILD
    nil
  end

  def wait_for_port(out, err, pid, timeout: 60)
    deadline = Time.now + timeout
    until Time.now > deadline
      text = File.exist?(out) ? File.read(out) : ""
      return Integer(Regexp.last_match(1)) if text =~ %r{listening on https?://[^\s]+:(\d+)}
      raise "server exited before listening:\n#{text}\n#{File.read(err)}" if Process.waitpid(pid, Process::WNOHANG)

      sleep 0.05
    end
    raise "no listening line within #{timeout} s:\n#{File.read(out)}\n#{File.read(err)}"
  end

  # The access-log lines in a stdout file, parsed as JSON.
  def json_lines(path)
    File.readlines(path).filter_map { |line| JSON.parse(line) if line.start_with?("{") }
  end

  # GET `target` from a control listener (URL as in --control-url) as pumactl
  # and HAProxy do: HTTP/1.0, one request per connection. Returns
  # [status, body, headers_text]; status 0 when nothing answered.
  def control_get(url, target, headers: {})
    socket = if url.start_with?("unix://") then UNIXSocket.new(url.delete_prefix("unix://"))
             else TCPSocket.new(*url.delete_prefix("tcp://").split(":"))
             end
    socket.write("GET #{target} HTTP/1.0\r\n#{headers.map { |k, v| "#{k}: #{v}\r\n" }.join}\r\n")
    response = read_all(socket, 30)
    head, body = response.split("\r\n\r\n", 2)
    status = head.to_s[/\AHTTP\/1\.[01] (\d{3})/, 1]
    [status ? Integer(status) : 0, body.to_s, head.to_s] # 0: closed without an answer
  rescue SystemCallError
    [0, "", ""] # nobody listens (yet, or any more)
  ensure
    socket&.close
  end

  def prometheus_parse(text)
    out, err, status = Open3.capture3("python3", PROMETHEUS_PARSE, stdin_data: text)
    raise "python prometheus_client is missing: pip install prometheus_client\n#{err}" if err.include?("No module named")
    raise "prometheus_client could not parse the text (#{status}):\n#{err}\n#{text}" unless status.success?

    JSON.parse(out)
  end

  # The value of one sample of a parsed family.
  def sample(families, family, name: family, labels: {})
    found = families.fetch(family)["samples"].find { |n, l, _| n == name && l == labels.transform_keys(&:to_s) }
    raise "no sample #{name}#{labels} in #{families[family]}" unless found

    found[2]
  end

  def free_port
    server = TCPServer.new("127.0.0.1", 0)
    server.local_address.ip_port
  ensure
    server&.close
  end

  def wait_for_exit(pid, seconds = 30)
    Timeout.timeout(seconds) { Process.wait2(pid)[1] }
  end
end

RSpec.configure { |config| config.include OpsHelpers }
