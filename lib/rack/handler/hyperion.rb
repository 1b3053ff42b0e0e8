# frozen_string_literal: true

require "socket"
require "hyperion"

module Rack
  module Handler
    # `rackup -s hyperion` and `rails server -u hyperion`: one Hyperion worker
    # on the Host/Port the launcher asks for. Options: Host, Port, Threads
    # ("N" or Puma's "MIN:MAX").
    module Hyperion
      DEFAULT_OPTIONS = { Host: "0.0.0.0", Port: 9292, Threads: "5" }.freeze

      def self.run(app, **options)
        options = DEFAULT_OPTIONS.merge(options.compact)
        threads = Integer(options[:Threads].to_s.split(":").last)
        @listener = TCPServer.new(options[:Host], Integer(options[:Port]))
        @worker = ::Hyperion::Worker.new(host: options[:Host], port: @listener.local_address.ip_port, app: app,
                                         read_timeout: ::Hyperion::Config::DEFAULTS[:read_timeout],
                                         thread_count: threads, listener: @listener)
        yield @worker if block_given?
        @worker.run
      ensure
        @listener&.close
      end

      # Rack::Server calls this on INT when the handler responds to it.
      def self.shutdown
        @worker&.stop
      end

      def self.valid_options
        { "Host=HOST" => "Hostname to listen on (default: 0.0.0.0)",
          "Port=PORT" => "Port to listen on (default: 9292)",
          "Threads=N|MIN:MAX" => "Ruby threads running the app (default: 5)" }
      end
    end

    register :hyperion, "Rack::Handler::Hyperion" if respond_to?(:register)
  end
end

# Rack 3 moved handlers to the rackup gem.
if defined?(Rackup::Handler)
  Rackup::Handler.register :hyperion, "Rack::Handler::Hyperion"
end
