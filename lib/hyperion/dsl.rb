# frozen_string_literal: true

require "hyperion/control"

module Hyperion
  # The language of `config/hyperion.rb`, in the style of Puma's. Every
  # directive is documented in docs/configuration.md. A mistake stops boot with
  # the file, the line and what to fix.
  class DSL
    LIMITS = %i[max_body_bytes max_uri_bytes max_header_bytes max_headers idle_timeout write_timeout
                max_request_read_seconds max_pending max_keepalive_requests max_connections max_fibers].freeze
    # Limits whose 0 would refuse everything; the others take 0 as it comes.
    AT_LEAST_ONE = %i[max_connections max_fibers].freeze
    # An HTTP field name (RFC 9110 token).
    HEADER_NAME = /\A[!#$%&'*+.^_`|~0-9A-Za-z-]+\z/.freeze

    def self.load(path, config)
      new(config, path).instance_eval(File.read(path), path, 1)
      config
    rescue Errno::ENOENT, Errno::EACCES => e
      raise ConfigError, "cannot read the config file #{path}: #{e.message.sub(/ @ .*/, '')}"
    rescue ConfigError
      raise
    rescue ScriptError, StandardError => e
      line = e.backtrace_locations&.find { |l| l.path == path }&.lineno ||
             e.message[/#{Regexp.escape(path)}:(\d+)/, 1]
      raise ConfigError, "#{path}:#{line}: #{e.class}: #{e.message.lines.first.to_s.strip.sub(/\A#{Regexp.escape(path)}:\d+: /, '')}"
    end

    def initialize(config, path)
      @config = config
      @path = path
    end

    # Listen on a URI: tcp://HOST:PORT, ssl://HOST:PORT?cert=...&key=..., unix:///path.
    # Each call adds one more listener, as in Puma.
    def bind(uri)
      Bind.parse(string(:bind, uri)) # checked now, so the error names this line
      @config.binds << uri
    rescue ConfigError => e
      fail!(e.message)
    end

    def port(number, host = nil)
      @config.port = integer(:port, number, 0..65_535)
      @config.host = string(:port, host) if host
    end

    # Ruby threads that run the app; threads MIN, MAX keeps MAX.
    def threads(min, max = min)
      integer(:threads, min, 0..1024)
      @config.threads = integer(:threads, max, 1..1024)
    end

    # Worker processes; above 1 a master forks and supervises them.
    def workers(count)
      @config.workers = integer(:workers, count, 1..1024)
    end

    # How workers share the port: :reuseport (each binds with SO_REUSEPORT,
    # the kernel balances; Linux default) or :share (the master binds, the
    # workers inherit; the default for unix sockets).
    def worker_model(model)
      model = model.to_sym
      fail!("worker_model expects :reuseport or :share, got #{model.inspect}") unless %i[reuseport share].include?(model)
      @config.worker_model = model
    end

    def environment(name)
      @config.environment = string(:environment, name)
    end

    def pidfile(path)
      @config.pidfile = string(:pidfile, path)
    end

    def preload_app!(enabled = true)
      fail!("preload_app! expects true or false, got #{enabled.inspect}") unless [true, false].include?(enabled)
      @config.preload_app = enabled
    end

    # Seconds a worker may go without a heartbeat (booting included) before
    # the master kills and replaces it.
    def worker_timeout(seconds)
      @config.worker_timeout = seconds(:worker_timeout, seconds)
    end

    # Recycle a worker gracefully (a new one first, then drain the old) once
    # its resident memory passes this many megabytes.
    def worker_max_rss_mb(megabytes)
      @config.worker_max_rss_mb = integer(:worker_max_rss_mb, megabytes, 1..)
    end

    # Send stdout and stderr to files (appending unless append is false);
    # SIGHUP reopens them, for logrotate.
    def stdout_redirect(stdout = nil, stderr = nil, append = true)
      string(:stdout_redirect, stdout) unless stdout.nil?
      string(:stdout_redirect, stderr) unless stderr.nil?
      @config.stdout_redirect = [stdout, stderr, append ? true : false]
    end

    def read_timeout(seconds)
      @config.read_timeout = seconds(:read_timeout, seconds)
    end

    def graceful_timeout(seconds)
      @config.graceful_timeout = seconds(:graceful_timeout, seconds)
    end

    LIMITS.each do |name|
      define_method(name) do |value|
        @config.limits[name] = if name.end_with?("timeout", "seconds") then seconds(name, value)
                               else integer(name, value, AT_LEAST_ONE.include?(name) ? 1.. : 0..)
                               end
      end
    end

    # tls cert: "chain.pem", key: "key.pem" (ca:, verify_mode:, self_signed:),
    # or the same as a block: tls { cert "chain.pem"; key "key.pem" }.
    def tls(**settings, &block)
      settings = BlockSettings.collect(settings, &block)
      unknown = settings.keys - %i[cert key ca verify_mode self_signed]
      fail!("tls: unknown setting #{unknown.first} (use cert, key, ca, verify_mode, self_signed)") if unknown.any?
      @config.tls = settings
    end

    # h2 max_concurrent_streams: 100, initial_window_size: 65_535,
    # max_frame_size: 16_384, max_header_list_size: 16_384 (or as a block).
    def h2(**settings, &block)
      @config.h2 = BlockSettings.collect(settings, &block)
    end

    # Lets the app send 103 Early Hints through env["rack.early_hints"]
    # (Rails' preload links do); early_hints false turns it off again.
    def early_hints(enabled = true)
      fail!("early_hints expects true or false, got #{enabled.inspect}") unless [true, false].include?(enabled)
      @config.early_hints = enabled
    end

    # Where REMOTE_ADDR comes from, as Puma's set_remote_address: :socket
    # (the peer), :localhost, a fixed String, header: "X-Real-IP" (the first
    # address in that header), or proxy_protocol: :v1 / :v2 (the PROXY
    # protocol header every connection must then open with).
    def set_remote_address(value = :socket)
      @config.remote_address =
        case value
        when :socket, :localhost then value
        when String
          fail!("set_remote_address: the String is empty") if value.empty?
          value
        when Hash then remote_address_hash(value)
        else
          fail!("set_remote_address expects :socket, :localhost, a String, header: \"X-Real-IP\" " \
                "or proxy_protocol: :v1 or :v2, got #{value.inspect}")
        end
    end

    # One access-log line per request on stdout (log_requests false turns it
    # off again); Puma's name. `quiet` is Puma's way of saying false.
    def log_requests(enabled = true)
      fail!("log_requests expects true or false, got #{enabled.inspect}") unless [true, false].include?(enabled)
      @config.log_requests = enabled
    end

    def quiet(enabled = true)
      fail!("quiet expects true or false, got #{enabled.inspect}") unless [true, false].include?(enabled)
      @config.log_requests = !enabled
    end

    # :text or :json for the access log; the default is JSON unless stdout
    # is a terminal.
    def log_format(format)
      format = format.to_sym if format.is_a?(String)
      fail!("log_format expects :text or :json, got #{format.inspect}") unless %i[text json].include?(format)
      @config.log_format = format
    end

    # On TERM, keep serving this many seconds while the control listener's
    # /ready answers 503, then stop (Kubernetes' preStop pattern).
    def drain_delay(seconds)
      number = Float(seconds, exception: false)
      fail!("drain_delay expects a number of seconds, 0 or more, got #{seconds.inspect}") unless number && number >= 0
      @config.drain_delay = seconds
    end

    # Puma's control app: activate_control_app "unix:///run/app-ctl.sock" or
    # "tcp://127.0.0.1:9293", { auth_token: "secret" } (needed on TCP);
    # also no_token: true (unix only) and umask: 0o077.
    def activate_control_app(url = nil, options = {})
      fail!("activate_control_app needs a URL: \"unix:///path\" or \"tcp://127.0.0.1:PORT\"") unless url.is_a?(String)
      fail!("activate_control_app options must be a Hash, got #{options.inspect}") unless options.is_a?(Hash)
      unknown = options.keys - %i[auth_token no_token umask]
      fail!("activate_control_app: unknown option #{unknown.first.inspect} (use auth_token:, no_token:, umask:)") if unknown.any?
      token = options[:no_token] ? nil : options[:auth_token]
      fail!("activate_control_app: auth_token expects a String, got #{token.inspect}") unless token.nil? || token.is_a?(String)
      begin
        Control::Settings.new(url: url, auth_token: token, umask: options[:umask]).check
      rescue ConfigError => e
        fail!(e.message)
      end
      @config.control_url = url
      @config.control_auth_token = token
      @config.control_url_umask = options[:umask]
    end

    # Runs each request in a fiber of its own under a fiber scheduler, so
    # requests that wait (sleep, sockets, Net::HTTP, Queue#pop) let the
    # others run on the same thread; max_fibers caps them per worker.
    def async_io(enabled = true)
      fail!("async_io expects true or false, got #{enabled.inspect}") unless [true, false].include?(enabled)
      @config.async_io = enabled
    end

    def io_threads(count)
      @config.io_threads = integer(:io_threads, count, 1..64)
    end

    Config::HOOKS.each do |hook|
      define_method(hook) do |&block|
        fail!("#{hook} needs a block") unless block
        @config.public_send(hook) << block
      end
    end

    def method_missing(name, *_args, &_block)
      known = (public_methods(false) + self.class.public_instance_methods(false)).map(&:to_s).uniq
      hint = known.min_by { |k| levenshtein(k, name.to_s) }
      fail!("unknown directive `#{name}`#{" (did you mean `#{hint}`?)" if hint && levenshtein(hint, name.to_s) <= 3}")
    end

    def respond_to_missing?(_name, _include_private = false) = false

    # Collects `name value` calls made inside a block into a Hash.
    class BlockSettings < BasicObject
      def self.collect(settings, &block)
        return settings unless block

        collector = new
        collector.instance_eval(&block)
        settings.merge(collector.__settings)
      end

      def initialize = @settings = {}
      def __settings = @settings

      def method_missing(name, value = true)
        @settings[name] = value
      end

      def respond_to_missing?(*) = true
    end

    private

    def fail!(message)
      line = caller_locations.find { |l| l.path == @path }&.lineno
      raise ConfigError, "#{@path}:#{line}: #{message}"
    end

    def remote_address_hash(value)
      fail!("set_remote_address takes one of header: or proxy_protocol:, got #{value.inspect}") unless value.size == 1

      key, setting = value.first
      case key
      when :header
        name = string(:"set_remote_address header:", setting)
        fail!("set_remote_address header: #{name.inspect} is not a header name") unless name.match?(HEADER_NAME)
        { header: name }
      when :proxy_protocol
        version = setting.to_s.downcase.to_sym
        return { proxy_protocol: version } if %i[v1 v2].include?(version)

        fail!("set_remote_address proxy_protocol: expects :v1 or :v2, got #{setting.inspect}")
      else
        fail!("set_remote_address: unknown key #{key.inspect} (use header: or proxy_protocol:)")
      end
    end

    def string(name, value)
      return value if value.is_a?(String)

      fail!("#{name} expects a String, got #{value.inspect}")
    end

    def integer(name, value, range)
      number = Integer(value, exception: false)
      return number if number && range.cover?(number)

      fail!("#{name} expects an Integer in #{range}, got #{value.inspect}")
    end

    def seconds(name, value)
      number = Float(value, exception: false)
      return value if number&.positive?

      fail!("#{name} expects a positive number of seconds, got #{value.inspect}")
    end

    def levenshtein(a, b)
      rows = (0..b.length).to_a
      a.each_char.with_index(1) do |ca, i|
        previous, rows[0] = rows[0], i
        b.each_char.with_index(1) do |cb, j|
          current = rows[j]
          rows[j] = [rows[j] + 1, rows[j - 1] + 1, previous + (ca == cb ? 0 : 1)].min
          previous = current
        end
      end
      rows[b.length]
    end
  end
end
