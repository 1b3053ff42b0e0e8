# frozen_string_literal: true

require "optparse"
require "socket"
require "hyperion"
require "hyperion/bind"
require "hyperion/dsl"
require "hyperion/systemd"
require "hyperion/cluster"

module Hyperion
  # `hyperion [options] [config.ru]`: parses options, reads config/hyperion.rb
  # (flags win over it), loads the rackup, binds and runs one worker. Every
  # user mistake ends as one line on stderr and exit status 1.
  class CLI
    BANNER = "Usage: hyperion [options] [config.ru]"
    DEFAULT_CONFIG = "config/hyperion.rb"

    # Flags that map one to one onto Worker limit keywords: [flag, keyword, type, help].
    LIMIT_FLAGS = [
      ["--max-request-read-seconds SECONDS", :max_request_read_seconds, Float,
       "Time for a whole request, head and body, else 408 (default 60)"],
      ["--idle-timeout SECONDS", :idle_timeout, Float, "Close an idle keep-alive connection after this (default 20)"],
      ["--write-timeout SECONDS", :write_timeout, Float,
       "Drop a client that reads nothing of a response for this long (default 10)"],
      ["--max-body-bytes BYTES", :max_body_bytes, Integer, "Largest request body, else 413 (default 1073741824)"],
      ["--max-uri-bytes BYTES", :max_uri_bytes, Integer, "Longest request target, else 414 (default 12288)"],
      ["--max-header-bytes BYTES", :max_header_bytes, Integer, "Largest header section, else 431 (default 114688)"],
      ["--max-headers COUNT", :max_headers, Integer, "Most header lines, else 431 (default 100)"],
      ["--max-pending COUNT", :max_pending, Integer,
       "Requests allowed to wait for a thread before new ones get 503 (default: no limit)"]
    ].freeze

    def initialize(argv, out: $stdout, err: $stderr)
      @argv = argv.dup
      @out = out
      @err = err
    end

    # Returns the process exit status.
    def run
      flags = parse
      return 0 if flags[:exit]

      config = configure(flags)
      bind = resolve_bind(config, flags)
      tls = tls_settings(bind, config)
      app = load_rackup(flags[:rackup])
      listener = Systemd.activated_listener || open_listener(bind)
      write_pidfile(config.pidfile)
      announce(config, bind, listener, tls)
      watchdog = Systemd.start_watchdog
      return run_cluster(config, bind, listener, app, tls) if config.workers > 1

      build_worker(config, bind, listener, app, tls).run
      0
    rescue OptionParser::ParseError => e
      fail_with "#{e.message} (see hyperion --help)"
    rescue Hyperion::Error => e
      fail_with e.message
    ensure
      watchdog&.kill
      Systemd.notify("STOPPING=1") if listener
      listener&.close
      File.delete(bind.path) if bind&.scheme == :unix && listener && File.socket?(bind.path)
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
      ENV["RACK_ENV"] = config.environment if config.environment
      config
    end

    def resolve_bind(config, flags)
      return Bind.parse(config.host, default_port: config.port) unless config.bind

      bind = Bind.parse(config.bind, default_port: config.port)
      bind.port = config.port if flags[:settings].key?(:port) && bind.scheme != :unix
      bind
    end

    # TLS from an ssl:// bind, the config file's `tls` and the --tls flags.
    def tls_settings(bind, config)
      tls = (bind.tls || {}).merge(config.tls || {})
      return nil if tls.empty?
      raise ConfigError, "unix binds cannot serve TLS; use ssl://HOST:PORT" if bind.scheme == :unix
      raise ConfigError, "--tls-key given without --tls-cert" if tls[:key] && !tls[:cert]
      raise ConfigError, "--tls-cert given without --tls-key" if tls[:cert] && !tls[:key]
      if tls[:cert] || tls[:key]
        tls.delete(:self_signed)
      elsif !tls[:self_signed]
        raise ConfigError, "--tls-ca and --tls-verify-mode need --tls-cert or --tls-self-signed"
      end

      tls
    end

    def run_cluster(config, bind, listener, app, tls)
      model = (ENV["HYPERION_WORKER_MODEL"] || config.worker_model || (bind.scheme == :unix ? :share : :reuseport)).to_sym
      unless %i[reuseport share].include?(model)
        raise ConfigError, "HYPERION_WORKER_MODEL must be reuseport or share, got #{model}"
      end
      raise ConfigError, "unix binds need worker_model :share" if model == :reuseport && bind.scheme == :unix

      build = lambda do |index, shared_listener, port|
        build_worker(config, bind, shared_listener, app, tls, index: index, port: port)
      end
      log = ->(message) { @err.puts "hyperion master: #{message}" }
      Cluster.new(config: config, bind: bind, model: model, build_worker: build, log: log).run(listener)
    end

    def build_worker(config, bind, listener, app, tls, index: 0, port: nil)
      port ||= listener.local_address.ip? ? listener.local_address.ip_port : 0
      Worker.new(host: bind.host || "localhost", port: port, app: app, read_timeout: config.read_timeout,
                 thread_count: config.threads, config: config, listener: listener, tls: tls,
                 h2_settings: config.h2, worker_index: index, **config.limits)
    rescue ArgumentError, TypeError => e
      # Worker messages start with the keyword; name the flag instead.
      flag = LIMIT_FLAGS.find { |(_, keyword)| e.message.start_with?("#{keyword}:") }
      raise ConfigError, flag ? e.message.sub(/\A#{flag[1]}:/, "#{flag[0].split.first}:") : e.message
    end

    def announce(config, bind, listener, tls)
      address = listener.local_address
      url = if address.unix?
              "unix://#{address.unix_path}"
            else
              host = address.ip_address.include?(":") ? "[#{address.ip_address}]" : address.ip_address
              host = bind.url_host if %w[0.0.0.0 [::]].include?(host) && bind.host
              "#{tls ? 'https' : 'http'}://#{host}:#{address.ip_port}"
            end
      config.on_worker_boot << lambda do |index|
        next unless index.zero? # once, also in cluster mode

        @out.puts "listening on #{url}"
        @out.flush
        Systemd.notify("READY=1\nSTATUS=listening on #{url}\nMAINPID=#{Process.pid}")
      end
    end

    def parse
      flags = { settings: {}, limits: {}, tls: {} }
      parser = OptionParser.new do |o|
        o.banner = BANNER
        o.separator ""
        o.on("-b", "--bind HOST|URI", "Address or URI to listen on: HOST, tcp://HOST:PORT, ssl://HOST:PORT?cert=..&key=.., " \
                                      "unix:///path (default 0.0.0.0)") do |v|
          if v.include?("://")
            flags[:settings][:bind] = v
          else
            flags[:settings][:host] = v
            flags[:settings][:bind] = nil
          end
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

    def load_rackup(path)
      unless File.file?(path)
        raise ConfigError, "no rackup file at #{path} (pass its path: hyperion path/to/config.ru)"
      end

      require "rack"
      loaded = Rack::Builder.parse_file(path)
      # Rack 2 returns [app, options]; Rack 3 returns the app.
      loaded.is_a?(Array) ? loaded.first : loaded
    rescue ScriptError, StandardError => e
      raise if e.is_a?(Hyperion::Error)

      raise ConfigError, "could not load #{path}: #{e.class}: #{e.message.lines.first&.chomp}"
    end

    def open_listener(bind)
      return UNIXServer.new(bind.path) if bind.scheme == :unix

      TCPServer.new(bind.host, bind.port)
    rescue Errno::EADDRINUSE
      raise BindError, "could not bind #{describe(bind)}: address already in use"
    rescue Errno::EACCES
      raise BindError, "could not bind #{describe(bind)}: permission denied" \
                       "#{' (ports below 1024 need root)' unless bind.scheme == :unix}"
    rescue Errno::EADDRNOTAVAIL, Errno::ENOENT, SocketError => e
      raise BindError, "could not bind #{describe(bind)}: #{e.message}"
    end

    def describe(bind)
      bind.scheme == :unix ? bind.path : "#{bind.url_host}:#{bind.port}"
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
