# frozen_string_literal: true

module Hyperion
  # Base class of every error Hyperion raises on purpose.
  class Error < StandardError; end

  # The listening address could not be bound (in use, no permission...).
  class BindError < Error; end

  # TLS certificate, key or CA files that cannot work (unreadable, not PEM,
  # key not matching the certificate, expired).
  class TLSError < Error; end

  # A configuration or command-line value that cannot work.
  class ConfigError < Error; end

  # The client has gone away: raised inside a streaming body's #each (so the
  # iteration stops; the server catches it), by a Rack 3 stream's #write,
  # and by rack.hijack when the connection is gone. An IOError, as a real
  # socket's error would be, so apps that rescue IOError handle it; the one
  # error here that is not a Hyperion::Error.
  class ClientDisconnected < IOError; end
end
