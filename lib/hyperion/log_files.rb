# frozen_string_literal: true

module Hyperion
  # stdout_redirect: points $stdout/$stderr (file descriptors 1 and 2, so the
  # Rust core's log lines follow) at files, and reopens them on SIGHUP after
  # logrotate has moved them away.
  module LogFiles
    module_function

    # redirect: [stdout_path, stderr_path, append] or nil.
    def open(redirect)
      return unless redirect

      stdout, stderr, append = redirect
      mode = append ? "a" : "w"
      $stdout.reopen(stdout, mode) if stdout
      $stderr.reopen(stderr, mode) if stderr
      [$stdout, $stderr].each { |io| io.sync = true }
    rescue SystemCallError => e
      raise ConfigError, "stdout_redirect: cannot open #{e.message.sub(/ @ .*/, '')}"
    end

    # Always appends: the files may hold lines written since the rotation.
    def reopen(redirect)
      return false unless redirect

      stdout, stderr, = redirect
      $stdout.reopen(stdout, "a") if stdout
      $stderr.reopen(stderr, "a") if stderr
      [$stdout, $stderr].each { |io| io.sync = true }
      true
    rescue SystemCallError => e
      warn "hyperion: could not reopen the log files: #{e.message}"
      false
    end
  end
end
