# frozen_string_literal: true

require "rbconfig"
require "hyperion/systemd"

module Hyperion
  # USR2's two steps. `check` loads the config file and the app in a fresh
  # process (`hyperion --check` with the same arguments), so a deploy with a
  # syntax error is refused while the current image keeps serving; `exec`
  # then replaces this process (same pid) with the same command line, the
  # listening sockets passed as open file descriptors.
  class Restarter
    # Signals whose default action would kill a master that has not yet
    # installed its handlers: while booting (also the image a hot restart
    # starts, since ignored signals stay ignored across exec) they are ignored.
    BOOT_IGNORED_SIGNALS = %w[USR1 USR2 HUP TTIN TTOU].freeze

    def self.ignore_boot_signals
      BOOT_IGNORED_SIGNALS.each { |name| Signal.trap(name, "IGNORE") }
    end

    def initialize(argv, log:, program: $PROGRAM_NAME, dir: Dir.pwd)
      @command = [RbConfig.ruby, File.expand_path(program, dir), *argv]
      @dir = dir
      @log = log
    end

    def check
      return true if system(*@command, "--check", chdir: @dir, out: :err)

      @log.call("hot restart cancelled: the config or the app does not load (see above); still serving")
      false
    end

    # What the server says once the restart is going ahead: the on_restart
    # hooks run and systemd hears RELOADING=1.
    def announce(config)
      config.run_hooks(:on_restart, @log)
      Systemd.notify("RELOADING=1\nMONOTONIC_USEC=#{Process.clock_gettime(Process::CLOCK_MONOTONIC, :microsecond)}")
    end

    def exec(env, redirects)
      $stdout.flush
      $stderr.flush
      Dir.chdir(@dir)
      self.class.ignore_boot_signals
      Kernel.exec(env, *@command, redirects.merge(close_others: false))
    end
  end
end
