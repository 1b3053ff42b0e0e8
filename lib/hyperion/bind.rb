# frozen_string_literal: true

require "uri"

module Hyperion
  # A listen address: `tcp://HOST:PORT`, `ssl://HOST:PORT?cert=..&key=..`
  # (also `ca=`, `verify_mode=`; no files means a self-signed development
  # certificate), `unix:///path/to.sock`, or a bare host (with a port apart).
  # Unix binds take `?umask=0077` for the socket file's permissions.
  Bind = Struct.new(:scheme, :host, :port, :path, :tls, :umask, keyword_init: true) do
    def self.parse(text, default_port: 9292)
      return new(scheme: :tcp, host: text, port: default_port) unless text.include?("://")

      uri = URI.parse(text)
      case uri.scheme
      when "tcp" then new(scheme: :tcp, host: host_of(uri, text), port: port_of(uri, text, default_port))
      when "ssl" then new(scheme: :ssl, host: host_of(uri, text), port: port_of(uri, text, default_port),
                          tls: tls_of(uri, text))
      when "unix"
        path = "#{uri.host}#{uri.path}"
        raise ConfigError, "bind #{text}: give the socket path, as in unix:///run/app.sock" if path.empty?

        new(scheme: :unix, path: path, umask: umask_of(uri, text))
      else
        raise ConfigError, "bind #{text}: unknown scheme #{uri.scheme.inspect} (use tcp://, ssl:// or unix://)"
      end
    rescue URI::InvalidURIError => e
      raise ConfigError, "bind #{text}: not a valid URI (#{e.message})"
    end

    def self.host_of(uri, text)
      host = uri.host.to_s.delete_prefix("[").delete_suffix("]")
      raise ConfigError, "bind #{text}: the host is missing (tcp://127.0.0.1:9292)" if host.empty?

      host
    end

    def self.port_of(uri, text, default_port)
      port = uri.port || default_port
      raise ConfigError, "bind #{text}: the port must be between 0 and 65535" unless (0..65_535).cover?(port)

      port
    end

    def self.tls_of(uri, text)
      params = URI.decode_www_form(uri.query.to_s).to_h
      unknown = params.keys - %w[cert key ca verify_mode]
      raise ConfigError, "bind #{text}: unknown ssl parameter #{unknown.first} (use cert, key, ca, verify_mode)" if unknown.any?

      tls = params.transform_keys(&:to_sym)
      tls[:verify_mode] = tls[:verify_mode].to_sym if tls[:verify_mode]
      tls[:self_signed] = true unless tls[:cert] || tls[:key]
      tls
    end

    def self.umask_of(uri, text)
      params = URI.decode_www_form(uri.query.to_s).to_h
      unknown = params.keys - %w[umask]
      raise ConfigError, "bind #{text}: unknown unix parameter #{unknown.first} (only umask)" if unknown.any?
      return nil unless params["umask"]

      umask = Integer(params["umask"], 8, exception: false)
      raise ConfigError, "bind #{text}: umask must be octal, as in umask=0077" unless umask&.between?(0, 0o777)

      umask
    end

    # As error messages name it: the path, or HOST:PORT.
    def to_s
      scheme == :unix ? path : "#{url_host}:#{port}"
    end

    def url_host
      host.include?(":") ? "[#{host}]" : host
    end
  end
end
