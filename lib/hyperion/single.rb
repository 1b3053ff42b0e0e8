# frozen_string_literal: true

require "hyperion/worker_monitor"
require "hyperion/log_files"
require "hyperion/systemd"
require "hyperion/control"

module Hyperion
  # `workers 1`: the worker runs in this process. USR2 drains it and
  # re-executes the same command line with the listening sockets still open,
  # so connections wait in the kernel backlog instead of being refused. HUP
  # reopens the log files; USR1, TTIN and TTOU need a cluster and are logged.
  # The control listener (when configured) is the worker's own, served by
  # its runtime; its commands signal this process, so they do what the
  # signals do (TERM honours drain_delay).
  class Single
    def initialize(config:, listeners:, build_worker:, restarter:, log:, control: nil)
      @config = config
      @listeners = listeners
      @build_worker = build_worker
      @restarter = restarter
      @log = log
      @control = control
      @restarting = false
    end

    def run
      # The worker closes the sockets it is given when it stops; it gets
      # duplicates so ours stay open for a hot restart.
      worker = @build_worker.call(0, @listeners.main.map(&:dup), worker_extras)
      Hyperion.stats_object = worker
      monitor = WorkerMonitor.new(signals: %w[HUP USR1 USR2 TTIN TTOU], interval: 5,
                                  on_signal: method(:on_signal))
      announce_stop(worker, monitor)
      monitor.start(worker)
      worker.run
      monitor.stop
      hot_restart if @restarting
      0
    end

    private

    def worker_extras
      extras = { drain_delay: @config.drain_delay }
      return extras unless @control

      commands = Control::Commands.new(
        restart: -> { signal_self("USR2") },
        phased_restart: lambda do
          @log.call("phased-restart needs workers; restarting instead, as Puma does")
          signal_self("USR2")
        end,
        stop: -> { signal_self("TERM") },
        halt: method(:halt!)
      )
      extras.merge(control: { listener: @control.socket, auth_token: @control.auth_token, handler: commands })
    end

    def signal_self(name) = Process.kill(name, Process.pid)

    # /halt: leave now, without draining. The files this process created
    # (pidfile, unix sockets) are removed first.
    def halt!
      @log.call("halt: exiting without draining")
      @listeners.close
      @control&.close
      File.delete(@config.pidfile) if @config.pidfile && File.exist?(@config.pidfile)
      $stdout.flush
      $stderr.flush
      exit!(0)
    end

    def on_signal(name, worker)
      case name
      when "HUP" then LogFiles.reopen(@config.stdout_redirect)
      when "STOP" then Systemd.notify("STOPPING=1") unless @restarting
      when "USR2"
        return if @restarting || !@restarter.check

        @restarting = true
        @restarter.announce(@config)
        @log.call("hot restart: draining, then re-executing with the listening sockets")
        worker.stop
      else
        @log.call("#{name} needs cluster mode (workers > 1); ignored")
      end
    end

    # STOPPING=1 as the stop begins, whoever starts it (TERM, INT, #stop).
    def announce_stop(worker, monitor)
      worker.define_singleton_method(:stop) do |*args|
        monitor.notice("STOP")
        super(*args)
      end
    end

    def hot_restart
      env, redirects = @listeners.inheritance
      @restarter.exec(env, redirects)
    rescue SystemCallError => e
      @log.call("hot restart failed: #{e.message}")
      raise Hyperion::Error, "hot restart failed: #{e.message}"
    end
  end
end
