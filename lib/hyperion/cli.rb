# frozen_string_literal: true

require "optparse"
require "socket"
require "hyperion"

module Hyperion
  # `hyperion [options] [config.ru]`: parses options, loads the rackup, binds
  # and runs one worker. Every user mistake ends as one line on stderr and
  # exit status 1.
  class CLI
    BANNER = "Usage: hyperion [options] [config.ru]"

    # Flags that map one to one onto Worker keywords: [flag, keyword, type, help].
    WORKER_FLAGS = [
      ["--read-timeout SECONDS", :read_timeout, Float, "Time for a request head to arrive, else 408 (default 30)"],
      ["--max-request-read-seconds SECONDS", :max_request_read_seconds, Float,
       "Time for a whole request, head and body, else 408 (default 60)"],
      ["--idle-timeout SECONDS", :idle_timeout, Float, "Close an idle keep-alive connection after this (default 20)"],
      ["--write-timeout SECONDS", :write_timeout, Float,
       "Drop a client that reads nothing of a response for this long (default 10)"],
      ["--graceful-timeout SECONDS", :graceful_timeout, Float,
       "On stop, wait this long for in-flight requests (default 30)"],
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
      options = parse
      return 0 if options[:exit]

      tls = tls_settings(options[:tls])
      app = load_rackup(options[:rackup])
      listener = bind(options[:host], options[:port])
      port = listener.local_address.ip_port
      url = "#{tls ? 'https' : 'http'}://#{url_host(options[:host])}:#{port}"
      config = Config.new(threads: options[:threads])
      config.on_worker_boot << lambda do |_index|
        @out.puts "listening on #{url}"
        @out.flush
      end
      worker = build_worker(options.merge(tls_keyword: tls), app, port, config, listener)
      worker.run
      0
    rescue OptionParser::ParseError => e
      fail_with "#{e.message} (see hyperion --help)"
    rescue Hyperion::Error => e
      fail_with e.message
    ensure
      listener&.close
    end

    private

    def build_worker(options, app, port, config, listener)
      keywords = { read_timeout: config.read_timeout, tls: options[:tls_keyword] }.merge(options[:worker])
      Worker.new(host: options[:host], port: port, app: app, thread_count: options[:threads], config: config,
                 listener: listener, **keywords)
    rescue ArgumentError, TypeError => e
      # Worker messages start with the keyword; name the flag instead.
      flag = WORKER_FLAGS.find { |(_, keyword)| e.message.start_with?("#{keyword}:") }
      raise ConfigError, flag ? e.message.sub(/\A#{flag[1]}:/, "#{flag[0].split.first}:") : e.message
    end

    def parse
      options = { host: Config::DEFAULTS[:host], port: Config::DEFAULTS[:port],
                  threads: Config::DEFAULTS[:threads], worker: {}, tls: {} }
      parser = OptionParser.new do |o|
        o.banner = BANNER
        o.separator ""
        o.on("-b", "--bind HOST", "Address to listen on (default #{options[:host]})") { |v| options[:host] = v }
        o.on("-p", "--port PORT", Integer, "Port to listen on, 0 for any free port (default #{options[:port]})") do |v|
          raise ConfigError, "--port must be between 0 and 65535, got #{v}" unless (0..65_535).cover?(v)

          options[:port] = v
        end
        o.on("-t", "--threads N", "Ruby threads that run the app; Puma's MIN:MAX is accepted, MAX is used " \
                                  "(default #{options[:threads]})") do |v|
          options[:threads] = parse_threads(v)
        end
        o.separator ""
        o.separator "TLS:"
        o.on("--tls-cert PATH", "PEM certificate chain; serves https") { |v| options[:tls][:cert] = v }
        o.on("--tls-key PATH", "PEM private key for --tls-cert") { |v| options[:tls][:key] = v }
        o.on("--tls-self-signed", "Generate a development certificate for localhost at boot") do
          options[:tls][:self_signed] = true
        end
        o.on("--tls-ca PATH", "PEM CAs that sign client certificates (with --tls-verify-mode)") do |v|
          options[:tls][:ca] = v
        end
        o.on("--tls-verify-mode MODE", %w[none peer force_peer],
             "Client certificates: none, peer (optional) or force_peer (required)") do |v|
          options[:tls][:verify_mode] = v.to_sym
        end
        o.separator ""
        o.separator "Limits and timeouts:"
        WORKER_FLAGS.each do |flag, keyword, type, help|
          o.on(flag, type, help) { |v| options[:worker][keyword] = v }
        end
        o.separator ""
        o.on("-v", "--version", "Print the version and exit") do
          @out.puts "hyperion #{VERSION}"
          options[:exit] = true
        end
        o.on("-h", "--help", "Show this help and exit") do
          @out.puts o
          options[:exit] = true
        end
      end
      rest = parser.parse(@argv)
      raise ConfigError, "one rackup file expected, got #{rest.length}: #{rest.join(' ')}" if rest.length > 1

      options[:rackup] = rest.first || "config.ru"
      options
    end

    def tls_settings(tls)
      return nil if tls.empty?
      raise ConfigError, "--tls-key given without --tls-cert" if tls[:key] && !tls[:cert]
      raise ConfigError, "--tls-cert given without --tls-key" if tls[:cert] && !tls[:key]
      if tls[:self_signed] && tls[:cert]
        raise ConfigError, "--tls-self-signed and --tls-cert exclude each other; give one"
      end
      raise ConfigError, "--tls-ca and --tls-verify-mode need --tls-cert or --tls-self-signed" unless tls[:cert] || tls[:self_signed]

      tls
    end

    def parse_threads(value)
      max = value.split(":", 2).last
      threads = Integer(max, exception: false)
      unless threads && threads.between?(1, 1024)
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

    def bind(host, port)
      TCPServer.new(host, port)
    rescue Errno::EADDRINUSE
      raise BindError, "could not bind #{url_host(host)}:#{port}: address already in use"
    rescue Errno::EACCES
      raise BindError, "could not bind #{url_host(host)}:#{port}: permission denied (ports below 1024 need root)"
    rescue Errno::EADDRNOTAVAIL, SocketError => e
      raise BindError, "could not bind #{url_host(host)}:#{port}: #{e.message}"
    end

    def url_host(host)
      host.include?(":") && !host.start_with?("[") ? "[#{host}]" : host
    end

    def fail_with(message)
      @err.puts "hyperion: #{message}"
      1
    end
  end
end
