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

    def initialize(argv, out: $stdout, err: $stderr)
      @argv = argv.dup
      @out = out
      @err = err
    end

    # Returns the process exit status.
    def run
      options = parse
      return 0 if options[:exit]

      app = load_rackup(options[:rackup])
      listener = bind(options[:host], options[:port])
      port = listener.local_address.ip_port
      url = "http://#{url_host(options[:host])}:#{port}"
      config = Config.new(threads: options[:threads])
      config.on_worker_boot << lambda do |_index|
        @out.puts "listening on #{url}"
        @out.flush
      end
      worker = Worker.new(host: options[:host], port: port, app: app,
                          read_timeout: config.read_timeout, thread_count: options[:threads],
                          config: config, listener: listener)
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

    def parse
      options = { host: Config::DEFAULTS[:host], port: Config::DEFAULTS[:port],
                  threads: Config::DEFAULTS[:threads] }
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
