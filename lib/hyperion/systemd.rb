# frozen_string_literal: true

require "socket"

module Hyperion
  # systemd integration: socket activation (adopt the listening sockets
  # systemd passed from fd 3 on) and sd_notify messages.
  module Systemd
    LISTEN_FDS_START = 3

    module_function

    # The listening sockets systemd passed (LISTEN_FDS/LISTEN_PID), or nil.
    # The variables are removed so workers and later images do not adopt
    # them a second time; a hot restart hands the sockets on itself.
    def activated_sockets(env = ENV)
      return nil unless env["LISTEN_PID"].to_i == Process.pid && env["LISTEN_FDS"].to_i >= 1

      count = env["LISTEN_FDS"].to_i
      %w[LISTEN_PID LISTEN_FDS LISTEN_FDNAMES].each { |name| env.delete(name) }
      Array.new(count) do |i|
        fd = LISTEN_FDS_START + i
        Socket.for_fd(fd).tap do |socket|
          socket.close_on_exec = true
          socket.local_address # raises unless it is a socket
        end
      rescue SystemCallError => e
        raise ConfigError, "LISTEN_FDS is set but fd #{fd} is not a listening socket (#{e.message})"
      end
    end

    # Sends one sd_notify message (READY=1, STOPPING=1, WATCHDOG=1...) when
    # NOTIFY_SOCKET is set; does nothing otherwise.
    def notify(message, env = ENV)
      path = env["NOTIFY_SOCKET"]
      return false if path.nil? || path.empty?

      path = "\0#{path[1..]}" if path.start_with?("@") # abstract namespace
      Socket.open(:UNIX, :DGRAM) { |s| s.connect(Socket.pack_sockaddr_un(path)); s.write(message) }
      true
    rescue SystemCallError
      false
    end

    # Pings the watchdog every half WATCHDOG_USEC, from a background thread.
    def start_watchdog(env = ENV)
      usec = env["WATCHDOG_USEC"].to_i
      return nil unless usec.positive? && (env["WATCHDOG_PID"].nil? || env["WATCHDOG_PID"].to_i == Process.pid)

      Thread.new do
        Thread.current.name = "hyperion-watchdog"
        loop do
          notify("WATCHDOG=1", env)
          sleep usec / 2_000_000.0
        end
      end
    end
  end
end
