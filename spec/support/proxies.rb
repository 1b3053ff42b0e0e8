# frozen_string_literal: true

require "etc"
require "fileutils"
require "socket"
require "tmpdir"

# Debian's real nginx and HAProxy in front of Hyperion, for the specs. Each
# runs in the foreground from a config file generated into a temp dir (logs,
# pid file and temp paths in there too), listens on loopback ports the caller
# picks with `free_port`, and is stopped by its pid when the block ends. The
# helpers are ready when every port the config listens on accepts
# connections; a proxy that exits first fails the example with its log.
#
#   with_nginx(http: <<~NGINX) { |dir| Net::HTTP.get(URI("http://127.0.0.1:#{front}/")) }
#     server {
#       listen 127.0.0.1:#{front};
#       location / { proxy_pass http://127.0.0.1:#{hyperion_port}; }
#     }
#   NGINX
#
# spec/behind_proxies_spec.rb also runs WebSockets through nginx (the
# `map $http_upgrade $connection_upgrade` config) and drain_delay under
# HAProxy's `option httpchk GET /ready` checks on the control port, watching
# `haproxy_stats(dir, "hyperion", "app")["status"]` turn DOWN.
module Proxies
  NGINX = "/usr/sbin/nginx"
  HAPROXY = "/usr/sbin/haproxy"
  # Debian ships nginx's stream module (TCP proxying, `proxy_protocol on`)
  # as libnginx-mod-stream.
  NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"

  # A port nothing listens on right now.
  def free_port
    server = TCPServer.new("127.0.0.1", 0)
    server.local_address.ip_port
  ensure
    server&.close
  end

  # Runs nginx with `http` (the inside of the http block) and/or `stream`
  # (the inside of a stream block); yields the temp dir (error log:
  # dir/nginx.log).
  def with_nginx(http: nil, stream: nil, &block)
    dir = Dir.mktmpdir("hyperion-nginx")
    config = +""
    config << "load_module #{NGINX_STREAM_MODULE};\n" if stream
    # As root nginx would run its workers as nobody, who cannot use dir.
    config << "user #{Etc.getpwuid(Process.uid).name};\n" if Process.uid.zero?
    config << <<~NGINX
      worker_processes 1;
      pid #{dir}/nginx.pid;
      error_log stderr notice;
      events { worker_connections 1024; }
    NGINX
    if http
      temp_paths = %w[client_body proxy fastcgi uwsgi scgi].map { |kind| "#{kind}_temp_path #{dir}/#{kind};" }
      config << "http {\n  access_log off;\n  #{temp_paths.join("\n  ")}\n#{http}}\n"
    end
    config << "stream {\n#{stream}}\n" if stream
    File.write(File.join(dir, "nginx.conf"), config)
    run_proxy([NGINX, "-p", dir, "-c", File.join(dir, "nginx.conf"), "-e", "stderr", "-g", "daemon off;"],
              dir, "nginx", listen_ports(config), &block)
  end

  # Runs HAProxy with `config` (frontends, backends, listen sections) after a
  # global section with an admin socket and defaults for `mode http` with
  # request logs; yields the temp dir (log: dir/haproxy.log).
  def with_haproxy(config, &block)
    dir = Dir.mktmpdir("hyperion-haproxy")
    full = <<~HAPROXY
      global
        stats socket #{dir}/admin.sock mode 600 level admin
        log stderr format iso local0 info
      defaults
        mode http
        log global
        option httplog
        timeout connect 5s
        timeout client 60s
        timeout server 60s
      #{config}
    HAPROXY
    File.write(File.join(dir, "haproxy.cfg"), full)
    run_proxy([HAPROXY, "-f", File.join(dir, "haproxy.cfg"), "-db"], dir, "haproxy", listen_ports(full), &block)
  end

  # A command on HAProxy's admin socket ("show stat", "show servers state",
  # "disable server backend/app"...); returns the answer.
  def haproxy_command(dir, command)
    UNIXSocket.open(File.join(dir, "admin.sock")) do |socket|
      socket.write("#{command}\n")
      socket.read
    end
  end

  # HAProxy's counters for one proxy line of "show stat" (e.g. "hyperion",
  # "BACKEND"), as a Hash of its CSV columns.
  def haproxy_stats(dir, proxy, server)
    header, *rows = haproxy_command(dir, "show stat").lines.map(&:chomp).reject(&:empty?)
    names = header.delete_prefix("# ").split(",")
    row = rows.map { |line| names.zip(line.split(",")).to_h }.find { |r| r["pxname"] == proxy && r["svname"] == server }
    row || raise("no stats for #{proxy}/#{server} in:\n#{rows.join("\n")}")
  end

  # Remote ports of the established TCP connections from `ip` to local port
  # `port` (IPv4, from /proc/net/tcp): who is connected to a server now.
  def connections_from(ip, port)
    hex_ip = ip.split(".").map(&:to_i).reverse.map { |octet| format("%02X", octet) }.join
    File.readlines("/proc/net/tcp").drop(1).filter_map do |line|
      local, remote, state = line.split[1, 3]
      next unless state == "01" && local.end_with?(format(":%04X", port)) && remote.start_with?("#{hex_ip}:")

      remote.split(":").last.to_i(16)
    end
  end

  private

  def listen_ports(config)
    config.scan(/^\s*(?:listen|bind)\s+127\.0\.0\.1:(\d+)/).flatten.map(&:to_i)
  end

  def run_proxy(command, dir, name, ports)
    log = File.join(dir, "#{name}.log")
    pid = Process.spawn(*command, %i[out err] => [log, "w"])
    wait_for_ports(ports, pid, log, name)
    yield dir
  ensure
    stop_proxy(pid) if pid
  end

  def wait_for_ports(ports, pid, log, name)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 30
    ports.each do |port|
      loop do
        raise "#{name} exited before listening:\n#{File.read(log)}" if Process.waitpid(pid, Process::WNOHANG)

        begin
          TCPSocket.new("127.0.0.1", port).close
          break
        rescue Errno::ECONNREFUSED
          raise "#{name} did not listen on #{port} within 30 s:\n#{File.read(log)}" if
            Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

          sleep 0.05
        end
      end
    end
  end

  # TERM (a fast stop for both), then KILL if it lingers; nginx's workers
  # leave with their master.
  def stop_proxy(pid)
    Process.kill("TERM", pid)
    Timeout.timeout(10) { Process.wait(pid) }
  rescue Timeout::Error
    Process.kill("KILL", pid)
    Process.wait(pid)
  rescue Errno::ESRCH, Errno::ECHILD
    nil
  end
end
