# frozen_string_literal: true

require "optparse"
require "socket"
require "uri"
require "hyperion/version"
require "hyperion/errors"
require "hyperion/config"
require "hyperion/bind"
require "hyperion/dsl"

module Hyperion
  # `hyperionctl COMMAND` (also `hyperion ctl COMMAND`), Puma's `pumactl`:
  # sends a command to the control listener, whose URL and token come from
  # the flags or the config file (`activate_control_app`); without one, the
  # commands that have a signal are sent to the pid in the pidfile, as
  # pumactl does (stop: TERM, restart: USR2, phased-restart: USR1, halt: QUIT).
  class Ctl
    BANNER = "Usage: hyperionctl [options] COMMAND"
    COMMANDS = %w[stats restart phased-restart stop halt gc-stats thread-backtraces metrics ready].freeze
    SIGNALS = { "stop" => "TERM", "restart" => "USR2", "phased-restart" => "USR1", "halt" => "QUIT" }.freeze
    PRINTED = %w[stats gc-stats thread-backtraces metrics ready].freeze
    TIMEOUT = 10

    def initialize(argv, out: $stdout, err: $stderr)
      @argv = argv.dup
      @out = out
      @err = err
    end

    # Returns the exit status.
    def run
      options = parse
      return 0 if options[:exit]

      command = options[:command]
      url = options[:control_url] || options[:config]&.control_url
      token = options[:control_token] || options[:config]&.control_auth_token
      return request(url, token, command) if url

      pidfile = options[:pidfile] || options[:config]&.pidfile
      return signal(pidfile, command) if pidfile

      fail_with "no control URL and no pidfile: give --control-url (and --control-token), --pidfile, " \
                "or -C a config file with activate_control_app or pidfile"
    rescue OptionParser::ParseError => e
      fail_with "#{e.message} (see hyperionctl --help)"
    rescue Hyperion::Error => e
      fail_with e.message
    end

    private

    def parse
      options = {}
      parser = OptionParser.new do |o|
        o.banner = BANNER
        o.separator ""
        o.separator "Commands: #{COMMANDS.join(', ')}"
        o.separator ""
        o.on("-C", "--config PATH", "Read the control URL, token and pidfile from this config file " \
                                    "(default config/hyperion.rb when it exists)") { |v| options[:config_path] = v }
        o.on("--control-url URL", "The control listener: unix:///path or tcp://HOST:PORT") do |v|
          options[:control_url] = v
        end
        o.on("--control-token TOKEN", "The control listener's token") { |v| options[:control_token] = v }
        o.on("-P", "--pidfile PATH", "Without a control URL: signal the process in this pidfile") do |v|
          options[:pidfile] = v
        end
        o.on("-h", "--help", "Show this help and exit") do
          @out.puts o
          options[:exit] = true
        end
        o.on("-v", "--version", "Print the version and exit") do
          @out.puts "hyperion #{VERSION}"
          options[:exit] = true
        end
      end
      rest = parser.parse(@argv)
      return options if options[:exit]

      command = rest.shift
      raise ConfigError, "give a command: #{COMMANDS.join(', ')}" unless command
      raise ConfigError, "unknown command #{command} (use #{COMMANDS.join(', ')})" unless COMMANDS.include?(command)
      raise ConfigError, "one command expected, got #{rest.size + 1}: #{[command, *rest].join(' ')}" if rest.any?

      options[:command] = command
      path = options[:config_path] || (CLI_DEFAULT_CONFIG if File.exist?(CLI_DEFAULT_CONFIG))
      options[:config] = DSL.load(path, Config.new) if path
      options
    end

    CLI_DEFAULT_CONFIG = "config/hyperion.rb"

    # GET /COMMAND?token=TOKEN over HTTP/1.0, as pumactl sends it.
    def request(url, token, command)
      target = "/#{command}"
      target += "?token=#{URI.encode_www_form_component(token)}" if token
      status, body = exchange(url, "GET #{target} HTTP/1.0\r\n\r\n")
      case status
      when 200
        @out.puts(PRINTED.include?(command) ? body : "Command #{command} sent success")
        0
      when 403 then fail_with "Unauthorized access to server (wrong auth token)"
      when 503
        return fail_with("#{command}: the server answered 503: #{body}") unless command == "ready"

        @out.puts body # not ready: draining or booting
        1
      else fail_with "#{command}: the server answered #{status}: #{body}"
      end
    end

    def exchange(url, request)
      socket = connect(url)
      socket.write(request)
      response = +""
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + TIMEOUT
      loop do
        left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
        raise Hyperion::Error, "#{url}: no answer within #{TIMEOUT} s" if left <= 0 || !socket.wait_readable(left)

        chunk = socket.read_nonblock(65_536, exception: false)
        break if chunk.nil?

        response << chunk unless chunk == :wait_readable
      end
      head, body = response.split("\r\n\r\n", 2)
      status = head.to_s[%r{\AHTTP/1\.[01] (\d{3})}, 1]
      raise Hyperion::Error, "#{url}: not an HTTP answer" unless status

      [Integer(status), body.to_s]
    ensure
      socket&.close
    end

    def connect(url)
      bind = Bind.parse(url)
      case bind.scheme
      when :unix then UNIXSocket.new(bind.path)
      when :tcp then Socket.tcp(bind.host, bind.port, connect_timeout: TIMEOUT)
      else raise ConfigError, "control URL #{url}: use unix:///path or tcp://HOST:PORT"
      end
    rescue SystemCallError, SocketError => e
      raise Hyperion::Error, "cannot reach the control listener at #{url}: #{e.message}"
    end

    def signal(pidfile, command)
      name = SIGNALS[command]
      raise ConfigError, "#{command} needs the control listener (activate_control_app or --control-url)" unless name

      pid = Integer(File.read(pidfile).strip, exception: false)
      raise Hyperion::Error, "#{pidfile} holds no pid" unless pid

      Process.kill(name, pid)
      @out.puts "Command #{command} sent success"
      0
    rescue Errno::ENOENT
      raise Hyperion::Error, "no pidfile at #{pidfile}"
    rescue Errno::ESRCH
      raise Hyperion::Error, "no process #{pid} (from #{pidfile})"
    end

    def fail_with(message)
      @err.puts "hyperionctl: #{message}"
      1
    end
  end
end
