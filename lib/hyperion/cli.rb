# frozen_string_literal: true

require "optparse"
require "socket"
require "hyperion"
require "hyperion/bind"
require "hyperion/dsl"
require "hyperion/systemd"
require "hyperion/cluster"
require "hyperion/single"
require "hyperion/listeners"
require "hyperion/log_files"
require "hyperion/restarter"
require "hyperion/control"
require "hyperion/ctl"

module Hyperion
  # `hyperion [options] [config.ru]`: parses options, reads config/hyperion.rb
  # (flags win over it), loads the rackup, binds, then runs one worker in this
  # process (Single) or a master and its workers (Cluster). Every user
  # mistake ends as one line on stderr and exit status 1.
  class CLI
    BANNER = "Usage: hyperion [options] [config.ru]"
    DEFAULT_CONFIG = "config/hyperion.rb"

    # Flags that map one to one onto Worker limit keywords: [flag, keyword, type, help].
    LIMIT_FLAGS = [
      ["--max-request-read-seconds SECONDS", :max_request_read_seconds, Float,
       "Time for a whole request, head and body, else 408 (default 60)"],
      ["--idle-timeout SECONDS", :idle_timeout, Float, "Close an idle keep-alive connection after this (default 20)"],
      ["--write-timeout SECONDS", :write_timeout, Float,
       "Drop a client that reads nothing of a response for this long; reset an HTTP/2 stream " \
       "that gets no window for this long (default 10)"],
      ["--max-body-bytes BYTES", :max_body_bytes, Integer, "Largest request body, else 413 (default 1073741824)"],
      ["--max-uri-bytes BYTES", :max_uri_bytes, Integer, "Longest request target, else 414 (default 12288)"],
      ["--max-header-bytes BYTES", :max_header_bytes, Integer, "Largest header section, else 431 (default 114688)"],
      ["--max-headers COUNT", :max_headers, Integer, "Most header lines, else 431 (default 100)"],
      ["--max-keepalive-requests COUNT", :max_keepalive_requests, Integer,
       "Close an HTTP/1.1 connection after this many requests, 0 for no limit (default 1000)"],
      ["--max-pending COUNT", :max_pending, Integer,
       "Requests allowed to wait for a thread before new ones get 503 (default: no limit)"],
      ["--max-connections COUNT", :max_connections, Integer,
       "Connections a worker serves at once; beyond it, it stops accepting until one closes (default: no limit)"],
      ["--max-fibers COUNT", :max_fibers, Integer,
       "With --async-io: requests a worker runs at once; beyond it they wait in the queue (default 1000)"]
    ].freeze

    def initialize(argv, out: $stdout, err: $stderr)
      @argv = argv.dup
      @out = out
      @err = err
      @restarter = Restarter.new(argv, log: method(:log))
    end

    # Returns the process exit status.
    def run
      return Ctl.new(@argv.drop(1), out: @out, err: @err).run if @argv.first == "ctl"

      Restarter.ignore_boot_signals
      flags = parse
      return 0 if flags[:exit]

      config = configure(flags)
      LogFiles.open(config.stdout_redirect)
      binds = resolve_binds(config, flags)
      control = control_settings(config)
      check_worker_settings(config)
      reuseport = config.workers > 1 && worker_model(config) == :reuseport
      app = load_rackup(flags[:rackup]) if config.workers == 1 || config.preload_app || flags[:check]
      check_rackup(flags[:rackup]) unless app # workers load it after the fork
      return 0 if flags[:check]

      listeners = Listeners.setup(binds, reuseport: reuseport)
      control&.open
      write_pidfile(config.pidfile)
      watchdog = Systemd.start_watchdog
      runner_class = config.workers > 1 ? Cluster : Single
      announce(config, listeners, cluster: runner_class == Cluster)
      build = lambda do |index, sockets, extras = {}|
        build_worker(config, listeners, sockets, app || load_rackup(flags[:rackup]), index, extras)
      end
      runner_class.new(config: config, listeners: listeners, build_worker: build, restarter: @restarter,
                       log: method(:log), control: control).run
    rescue OptionParser::ParseError => e
      fail_with "#{e.message} (see hyperion --help)"
    rescue Hyperion::Error => e
      fail_with e.message
    ensure
      watchdog&.kill
      listeners&.close
      control&.close
      File.delete(config.pidfile) if config&.pidfile && File.exist?(config.pidfile)
    end

    private

    # Defaults, then the config file, then the flags.
    def configure(flags)
      config = Config.new
      path = flags[:config] || (DEFAULT_CONFIG if File.exist?(DEFAULT_CONFIG))
      DSL.load(path, config) if path
      flags[:settings].each { |name, value| config.public_send("#{name}=", value) }
      config.limits = config.limits.merge(flags[:limits])
      config.tls = (config.tls || {}).merge(flags[:tls]) if flags[:tls].any?
      config.stdout_redirect = flags[:redirect] if flags[:redirect][0] || flags[:redirect][1]
      config.control_auth_token = flags[:control_token] if flags[:control_token]
      ENV["RACK_ENV"] = config.environment if config.environment
      config
    end

    # -b flags replace the config file's binds; -p sets the port of every
    # TCP bind; TLS settings go to the ssl:// binds, or to every TCP bind when
    # there is none.
    def resolve_binds(config, flags)
      uris = flags[:binds].any? ? flags[:binds] : config.binds
      uris = [config.host] if uris.empty?
      binds = uris.map { |uri| Bind.parse(uri, default_port: config.port) }
      binds.each { |bind| bind.port = config.port unless bind.scheme == :unix } if flags[:settings].key?(:port)
      ssl = binds.select { |bind| bind.scheme == :ssl }
      extra = config.tls || {}
      targets = ssl.any? ? ssl : binds.reject { |bind| extra.empty? || bind.scheme == :unix }
      raise ConfigError, "unix binds cannot serve TLS; use ssl://HOST:PORT" if targets.empty? && !extra.empty?

      targets.each { |bind| bind.tls = tls_settings((bind.tls || {}).merge(extra)) }
      binds
    end

    def tls_settings(tls)
      raise ConfigError, "--tls-key given without --tls-cert" if tls[:key] && !tls[:cert]
      raise ConfigError, "--tls-cert given without --tls-key" if tls[:cert] && !tls[:key]
      if tls[:cert] || tls[:key]
        tls.delete(:self_signed)
      elsif !tls[:self_signed]
        raise ConfigError, "--tls-ca and --tls-verify-mode need --tls-cert or --tls-self-signed"
      end

      tls
    end

    # The control listener's settings, checked now (one line on a mistake).
    def control_settings(config)
      return nil unless config.control_url

      Control::Settings.new(url: config.control_url, auth_token: config.control_auth_token,
                            umask: config.control_url_umask).check
    end

    def worker_model(config)
      model = (ENV["HYPERION_WORKER_MODEL"] || config.worker_model || :reuseport).to_sym
      return model if %i[reuseport share].include?(model)

      raise ConfigError, "HYPERION_WORKER_MODEL must be reuseport or share, got #{model}"
    end

    def log(message)
      @err.puts "hyperion master: #{message}"
    end

    # Cluster workers are built after the fork: a bad limit must stop the
    # master at boot (and --check), not every worker it forks. Worker.new
    # only validates; nothing binds or runs.
    def check_worker_settings(config)
      Worker.new(host: "127.0.0.1", port: 0, app: ->(_env) {}, read_timeout: config.read_timeout,
                 thread_count: config.threads, config: config, h2_settings: config.h2,
                 early_hints: config.early_hints, remote_address: config.remote_address, **logging(config),
                 drain_delay: config.drain_delay, async_io: config.async_io, **config.limits)
    rescue ArgumentError, TypeError => e
      raise ConfigError, flag_message(e)
    end

    # Access-log keywords of Worker.new.
    def logging(config)
      { log_requests: config.log_requests, log_format: config.log_format }
    end

    # extras: Worker keywords the runner adds (control:, drain_delay: for a
    # single process; stats: for a cluster's worker).
    def build_worker(config, listeners, sockets, app, index, extras = {})
      address = sockets.first.local_address
      tls = sockets.each_index.map { |i| listeners.tls_at(i) }
      tls = if tls.none? then nil
            elsif sockets.size == 1 then tls.first
            else tls
            end
      Worker.new(host: address.ip? ? address.ip_address : "localhost", port: address.ip? ? address.ip_port : 0,
                 app: app, read_timeout: config.read_timeout, thread_count: config.threads, config: config,
                 listener: sockets.size == 1 ? sockets.first : sockets, tls: tls,
                 h2_settings: config.h2, early_hints: config.early_hints, remote_address: config.remote_address,
                 async_io: config.async_io, worker_index: index, **logging(config), **extras, **config.limits)
    rescue ArgumentError, TypeError => e
      raise ConfigError, flag_message(e)
    end

    # Worker messages start with the keyword; name the flag instead.
    def flag_message(error)
      flag = LIMIT_FLAGS.find { |(_, keyword)| error.message.start_with?("#{keyword}:") }
      flag ? error.message.sub(/\A#{flag[1]}:/, "#{flag[0].split.first}:") : error.message
    end

    # A cluster's master listens before it forks, so it can say so at once
    # (connections wait in the backlog until a worker takes them); one
    # process says so once its worker serves, with READY=1 for systemd.
    def announce(config, listeners, cluster:)
      lines = listeners.urls.map { |url| "listening on #{url}" }
      if cluster
        @out.puts lines
        @out.flush
        return
      end

      config.on_worker_boot << lambda do |_index|
        @out.puts lines
        @out.flush
        Systemd.notify("READY=1\nSTATUS=#{lines.join(', ')}\nMAINPID=#{Process.pid}")
      end
    end

    def parse
      flags = { settings: {}, limits: {}, tls: {}, binds: [], redirect: [nil, nil, true] }
      parser = OptionParser.new do |o|
        o.banner = BANNER
        o.separator ""
        o.on("-b", "--bind HOST|URI", "Address or URI to listen on: HOST, tcp://HOST:PORT, ssl://HOST:PORT?cert=..&key=.., " \
                                      "unix:///path; repeat for several (default 0.0.0.0)") do |v|
          flags[:binds] << v
        end
        o.on("-p", "--port PORT", Integer, "Port to listen on, 0 for any free port (default 9292)") do |v|
          raise ConfigError, "--port must be between 0 and 65535, got #{v}" unless (0..65_535).cover?(v)

          flags[:settings][:port] = v
        end
        o.on("-t", "--threads N", "Ruby threads that run the app; Puma's MIN:MAX is accepted, MAX is used " \
                                  "(default 5)") do |v|
          flags[:settings][:threads] = parse_threads(v)
        end
        o.on("-w", "--workers N", Integer, "Worker processes; above 1 a master forks and supervises them " \
                                           "(default 1)") do |v|
          raise ConfigError, "--workers must be between 1 and 1024, got #{v}" unless (1..1024).cover?(v)

          flags[:settings][:workers] = v
        end
        o.on("-C", "--config PATH", "Config file (default #{DEFAULT_CONFIG} when it exists)") { |v| flags[:config] = v }
        o.on("-e", "--environment NAME", "Sets RACK_ENV") { |v| flags[:settings][:environment] = v }
        o.on("--pidfile PATH", "Write the process id here while running") { |v| flags[:settings][:pidfile] = v }
        o.on("--[no-]preload", "With workers: load the app once in the master before forking (default on)") do |v|
          flags[:settings][:preload_app] = v
        end
        o.on("--worker-timeout SECONDS", Float, "Kill a worker silent for this long (default 60)") do |v|
          raise ConfigError, "--worker-timeout must be a positive number of seconds, got #{v}" unless v.positive?

          flags[:settings][:worker_timeout] = v
        end
        o.on("--[no-]early-hints", "Let the app send 103 Early Hints (env[\"rack.early_hints\"]; default off)") do |v|
          flags[:settings][:early_hints] = v
        end
        o.on("--proxy-protocol VERSION", %w[v1 v2], "Every connection opens with a PROXY protocol header " \
                                                    "(v1 or v2); REMOTE_ADDR comes from it (default off)") do |v|
          flags[:settings][:remote_address] = { proxy_protocol: v.to_sym }
        end
        o.on("--[no-]log-requests", "One access-log line per request on stdout (default off)") do |v|
          flags[:settings][:log_requests] = v
        end
        o.on("--log-format FORMAT", %w[text json], "Access log as text or json (default: json unless stdout " \
                                                   "is a terminal)") do |v|
          flags[:settings][:log_format] = v.to_sym
        end
        o.on("--drain-delay SECONDS", Float, "On TERM, keep serving this long while /ready answers 503, " \
                                             "then stop (default 0)") do |v|
          raise ConfigError, "--drain-delay must be 0 or more seconds, got #{v}" if v.negative?

          flags[:settings][:drain_delay] = v
        end
        o.on("--[no-]async-io", "Run each request in a fiber, so requests that wait on I/O share a thread " \
                                "(default off)") do |v|
          flags[:settings][:async_io] = v
        end
        o.on("--redirect-stdout PATH", "Append stdout to this file; HUP reopens it") do |v|
          flags[:redirect][0] = v
        end
        o.on("--redirect-stderr PATH", "Append stderr to this file; HUP reopens it") do |v|
          flags[:redirect][1] = v
        end
        o.on("--[no-]redirect-append", "Append to the redirect files (default) or truncate them") do |v|
          flags[:redirect][2] = v
        end
        o.separator ""
        o.separator "TLS:"
        o.on("--tls-cert PATH", "PEM certificate chain; serves https") { |v| flags[:tls][:cert] = v }
        o.on("--tls-key PATH", "PEM private key for --tls-cert") { |v| flags[:tls][:key] = v }
        o.on("--tls-self-signed", "Generate a development certificate for localhost at boot") do
          flags[:tls][:self_signed] = true
        end
        o.on("--tls-ca PATH", "PEM CAs that sign client certificates (with --tls-verify-mode)") do |v|
          flags[:tls][:ca] = v
        end
        o.on("--tls-verify-mode MODE", %w[none peer force_peer],
             "Client certificates: none, peer (optional) or force_peer (required)") do |v|
          flags[:tls][:verify_mode] = v.to_sym
        end
        o.separator ""
        o.separator "Limits and timeouts:"
        o.on("--read-timeout SECONDS", Float, "Time for a request head to arrive, else 408 (default 30)") do |v|
          flags[:settings][:read_timeout] = v
        end
        o.on("--graceful-timeout SECONDS", Float, "On stop, wait this long for in-flight requests (default 30)") do |v|
          flags[:settings][:graceful_timeout] = v
        end
        LIMIT_FLAGS.each do |flag, keyword, type, help|
          o.on(flag, type, help) { |v| flags[:limits][keyword] = v }
        end
        o.separator ""
        o.separator "Control listener (see also `hyperion ctl --help`):"
        o.on("--control-url URL", "Serve /stats, /metrics, /ready and Puma's commands on unix:///path or " \
                                  "tcp://HOST:PORT") do |v|
          flags[:settings][:control_url] = v
        end
        o.on("--control-token TOKEN", "The control listener's token (needed on tcp://)") do |v|
          flags[:control_token] = v
        end
        o.separator ""
        o.on("--check", "Load the config file and the app, then exit (USR2 runs this first)") { flags[:check] = true }
        o.on("-v", "--version", "Print the version and exit") do
          @out.puts "hyperion #{VERSION}"
          flags[:exit] = true
        end
        o.on("-h", "--help", "Show this help and exit") do
          @out.puts o
          flags[:exit] = true
        end
      end
      rest = parser.parse(@argv)
      raise ConfigError, "one rackup file expected, got #{rest.length}: #{rest.join(' ')}" if rest.length > 1

      flags[:rackup] = rest.first || "config.ru"
      flags
    end

    def parse_threads(value)
      max = value.split(":", 2).last
      threads = Integer(max, exception: false)
      unless threads&.between?(1, 1024)
        raise ConfigError, "--threads expects N or MIN:MAX with N between 1 and 1024, got #{value.inspect}"
      end

      threads
    end

    def check_rackup(path)
      return if File.file?(path)

      raise ConfigError, "no rackup file at #{path} (pass its path: hyperion path/to/config.ru)"
    end

    def load_rackup(path)
      check_rackup(path)
      require "rack"
      loaded = Rack::Builder.parse_file(path)
      # Rack 2 returns [app, options]; Rack 3 returns the app.
      loaded.is_a?(Array) ? loaded.first : loaded
    rescue ScriptError, StandardError => e
      raise if e.is_a?(Hyperion::Error)

      raise ConfigError, "could not load #{path}: #{e.class}: #{e.message.lines.first&.chomp}"
    end

    def write_pidfile(path)
      File.write(path, "#{Process.pid}\n") if path
    rescue SystemCallError => e
      raise ConfigError, "cannot write the pidfile #{path}: #{e.message}"
    end

    def fail_with(message)
      @err.puts "hyperion: #{message}"
      1
    end
  end
end
