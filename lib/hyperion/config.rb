# frozen_string_literal: true

module Hyperion
  # Server settings and hook lists. `Hyperion::Worker` reads the hooks and the
  # timing settings from it; the config-file DSL fills one in.
  class Config
    DEFAULTS = {
      host: "0.0.0.0",
      port: 9292,
      threads: 5,
      workers: 1,
      read_timeout: 30,
      graceful_timeout: 30,
      io_threads: 1
    }.freeze

    attr_accessor(*DEFAULTS.keys)
    attr_reader :on_worker_boot, :on_worker_shutdown

    def initialize(**settings)
      DEFAULTS.merge(settings).each do |name, value|
        raise ArgumentError, "unknown setting: #{name}" unless DEFAULTS.key?(name)

        public_send("#{name}=", value)
      end
      @on_worker_boot = []
      @on_worker_shutdown = []
    end
  end
end
