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
  # socket's error would be, so apps that rescue IOError handle it (so not a
  # Hyperion::Error).
  class ClientDisconnected < IOError; end

  # With async_io: raised inside a request's fiber that is waiting when its
  # app thread is killed (Thread#kill, or the end of graceful_timeout), so the
  # request unwinds (ensure blocks run) and is answered 500. Not a
  # StandardError, so a bare `rescue` in the app does not swallow it.
  class FiberTerminated < Exception; end # rubocop:disable Lint/InheritException
end
