# frozen_string_literal: true

require "socket"

module Hyperion
  # systemd integration for a single process: socket activation (adopt the
  # listening socket systemd passed as fd 3) and sd_notify readiness.
  module Systemd
    LISTEN_FDS_START = 3

    module_function

    # The listener systemd passed (LISTEN_FDS/LISTEN_PID), or nil.
    def activated_listener(env = ENV)
      return nil unless env["LISTEN_PID"].to_i == Process.pid && env["LISTEN_FDS"].to_i >= 1

      socket = Socket.for_fd(LISTEN_FDS_START)
      socket.autoclose = false
      address = socket.local_address
      address.unix? ? UNIXServer.for_fd(LISTEN_FDS_START) : TCPServer.for_fd(LISTEN_FDS_START)
    rescue SystemCallError => e
      raise ConfigError, "LISTEN_FDS is set but fd #{LISTEN_FDS_START} is not a listening socket (#{e.message})"
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
