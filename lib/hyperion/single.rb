# frozen_string_literal: true

require "hyperion/worker_monitor"
require "hyperion/log_files"
require "hyperion/systemd"

module Hyperion
  # `workers 1`: the worker runs in this process. USR2 drains it and
  # re-executes the same command line with the listening sockets still open,
  # so connections wait in the kernel backlog instead of being refused. HUP
  # reopens the log files; USR1, TTIN and TTOU need a cluster and are logged.
  class Single
    def initialize(config:, listeners:, build_worker:, restarter:, log:)
      @config = config
      @listeners = listeners
      @build_worker = build_worker
      @restarter = restarter
      @log = log
      @restarting = false
    end

    def run
      # The worker closes the sockets it is given when it stops; it gets
      # duplicates so ours stay open for a hot restart.
      worker = @build_worker.call(0, @listeners.main.map(&:dup))
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
