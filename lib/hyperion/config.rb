# frozen_string_literal: true

module Hyperion
  # Server settings and hook lists, filled in layers: defaults, then
  # `config/hyperion.rb` (see DSL), then command-line flags.
  # `Hyperion::Worker` reads the hooks and the timing settings from it.
  class Config
    DEFAULTS = {
      host: "0.0.0.0",
      port: 9292,
      binds: [], # bind URIs (tcp://, ssl://, unix://); when empty, host and port
      threads: 5,
      workers: 1,
      worker_model: nil, # :reuseport or :share; see Cluster
      environment: nil,
      pidfile: nil,
      preload_app: true,
      worker_timeout: 60, # seconds without a heartbeat before the master kills a worker
      worker_max_rss_mb: nil, # recycle a worker gracefully above this resident size
      stdout_redirect: nil, # [stdout_path, stderr_path, append]; HUP reopens them
      read_timeout: 30,
      graceful_timeout: 30,
      io_threads: 1,
      tls: nil,
      h2: nil,
      early_hints: false, # env["rack.early_hints"] (103 Early Hints), off as in Puma
      # Where REMOTE_ADDR comes from: set_remote_address's argument, as given
      # (:socket, :localhost, a String, { header: }, { proxy_protocol: }).
      remote_address: :socket,
      log_requests: false, # one access-log line per request on stdout, off as in Puma
      log_format: nil, # :text or :json; nil: JSON unless stdout is a terminal
      drain_delay: 0, # seconds a TERM keeps serving with /ready answering 503
      control_url: nil, # the control listener (Puma's activate_control_app)
      control_auth_token: nil,
      control_url_umask: nil, # permissions of a unix control socket (default 0077)
      async_io: false, # each request in a fiber under a fiber scheduler (max_fibers in limits)
      # Worker keywords beyond the seed API (limits and timeouts); nil means
      # the server's default.
      limits: {}
    }.freeze

    HOOKS = %i[on_worker_boot on_worker_shutdown before_fork on_restart on_booted].freeze

    attr_accessor(*DEFAULTS.keys)
    attr_reader(*HOOKS)

    # Runs a master hook list (before_fork, on_restart, on_booted): an
    # exception is logged with the hook's name and the remaining hooks run.
    def run_hooks(name, log)
      public_send(name).each do |hook|
        hook.call
      rescue StandardError => e
        log.call("#{name} hook raised #{e.class}: #{e.message} (#{e.backtrace&.first})")
      end
    end

    def initialize(**settings)
      DEFAULTS.merge(settings).each do |name, value|
        raise ArgumentError, "unknown setting: #{name}" unless DEFAULTS.key?(name)

        public_send("#{name}=", value.dup)
      end
      HOOKS.each { |hook| instance_variable_set("@#{hook}", []) }
    end
  end
end
