# frozen_string_literal: true

require "json"
require "socket"
require "hyperion/bind"
require "hyperion/listeners"

module Hyperion
  # The Ruby side of the control listener (Puma's control app; the Rust side
  # is src/control/). A single worker serves it from its own tokio runtime
  # and calls Commands on its control thread; a cluster's master serves it
  # with ControlServer. `Control.parse_head` comes from the native extension.
  module Control
    # Where the control listener listens and with which token, from
    # `activate_control_app` or --control-url/--control-token.
    class Settings
      # A unix control socket without a token is guarded by its permissions:
      # owner only unless the user says otherwise.
      DEFAULT_UMASK = 0o077

      attr_reader :url, :auth_token, :socket

      def initialize(url:, auth_token:, umask: nil)
        @url = url
        @auth_token = auth_token.nil? || auth_token.empty? ? nil : auth_token
        @umask = umask
      end

      # Raises ConfigError (one line) for a URL or token that cannot work.
      def check
        unless @umask.nil? || (@umask.is_a?(Integer) && @umask.between?(0, 0o777))
          raise ConfigError, "control umask must be an Integer such as 0o077, got #{@umask.inspect}"
        end

        bind
        self
      end

      def unix? = bind.scheme == :unix

      # Binds the socket; a unix socket file left by a process that is gone
      # is replaced.
      def open
        remove_stale_socket if unix?
        @socket = Listeners.open(bind, reuseport: false)
        @created = unix?
        self
      rescue BindError => e
        raise BindError, "control listener: #{e.message}"
      end

      def close
        return unless @socket

        @socket.close unless @socket.closed?
        File.delete(bind.path) if @created && File.socket?(bind.path)
      rescue SystemCallError
        nil
      end

      private

      def bind
        @bind ||= begin
          bind = Bind.parse(@url)
          unless %i[tcp unix].include?(bind.scheme) && @url.include?("://")
            raise ConfigError, "control URL #{@url}: use unix:///path or tcp://HOST:PORT"
          end
          if bind.scheme == :tcp && @auth_token.nil?
            raise ConfigError, "control URL #{@url}: a TCP control listener needs a token (auth_token: or " \
                               "--control-token), since anyone who can connect could stop the server; " \
                               "or use a unix:// socket"
          end
          bind.umask ||= @umask || DEFAULT_UMASK if bind.scheme == :unix
          bind
        end
      end

      def remove_stale_socket
        return unless File.socket?(bind.path)

        UNIXSocket.new(bind.path).close
        raise BindError, "could not bind #{bind.path}: another process listens there"
      rescue Errno::ECONNREFUSED
        File.delete(bind.path)
      end
    end

    # What the endpoints that need Ruby do: `call(name)` returns
    # `[status, json_body, after]`; `after` (or nil) runs once the answer is
    # on its way. The actions are the runner's (a single process signals
    # itself; a cluster master queues the signal's name for its loop).
    class Commands
      OK = '{ "status": "ok" }'

      def initialize(restart:, phased_restart:, stop:, halt:)
        @actions = { "restart" => restart, "phased-restart" => phased_restart, "stop" => stop, "halt" => halt }
      end

      def call(name)
        if (action = @actions[name])
          [200, OK, action]
        elsif name == "gc-stats"
          [200, JSON.generate(GC.stat), nil]
        elsif name == "thread-backtraces"
          [200, JSON.generate(self.class.thread_backtraces), nil]
        else
          [404, %({ "error": "#{name.tr('-', '_')} not available" }), nil]
        end
      end

      # Puma's format: [{ name:, backtrace: [...] }, ...].
      def self.thread_backtraces
        Thread.list.map do |thread|
          name = "Thread: TID-#{thread.object_id.to_s(36)}"
          name += " #{thread.name}" if thread.name
          { name: name, backtrace: thread.backtrace || ["<no backtrace available>"] }
        end
      end
    end
  end
end
