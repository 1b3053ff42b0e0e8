# frozen_string_literal: true

require "hyperion/signal_queue"
require "hyperion/worker_monitor"
require "hyperion/log_files"
require "hyperion/systemd"

module Hyperion
  # The master of `workers N` (N > 1). It forks workers from Ruby (no tokio
  # runtime exists here before a fork), keeps every index slot filled, listens
  # to their heartbeats and turns signals into actions; trap handlers only
  # queue the signal's name (see SignalQueue).
  #
  # The master holds every listening socket (see Listeners) for its whole
  # life, so a worker that stops, dies or is replaced leaves its queued
  # connections to the next worker of its slot instead of resetting them.
  class Cluster
    SIGNALS = %w[TERM INT TTIN TTOU USR1 USR2 HUP CHLD].freeze
    # A worker that dies sooner than this after its start counts as a crash
    # at boot; that many in a row make the master give up.
    QUICK_DEATH = 5.0
    MAX_QUICK_DEATHS = 5
    OLD_WORKERS_ENV = "HYPERION_OLD_WORKERS"
    # A stopping worker drains within graceful_timeout, then kills the app
    # threads still busy (up to 2 s for them to unwind), shuts its I/O
    # runtime down (up to 1 s) and runs on_worker_shutdown: the master waits
    # this much longer than graceful_timeout before it KILLs the worker.
    STOP_SLACK = 5

    # One forked worker. `index` is nil for a worker inherited from the
    # image before a hot restart.
    Child = Struct.new(:index, :pid, :started_at, :reader, :last_seen, :booted, :retired_at, keyword_init: true) do
      def retiring? = !retired_at.nil?
    end

    # build_worker: ->(index, sockets) { Hyperion::Worker }, called in the
    # child. restarter: a Restarter, for USR2.
    def initialize(config:, listeners:, build_worker:, restarter:, log:, env: ENV)
      @config = config
      @listeners = listeners
      @build_worker = build_worker
      @restarter = restarter
      @log = log
      @children = []
      @quick_deaths = 0
      @phased = [] # slot indices still to replace in a phased restart
      @replacing = {} # slot index => the Child being replaced
      @booted_once = false
      @old_generation = env.delete(OLD_WORKERS_ENV).to_s.split(",").map do |pid|
        Child.new(pid: Integer(pid), started_at: monotonic, last_seen: monotonic, booted: true)
      end
    end

    # Returns the exit status.
    def run
      @signals = SignalQueue.new(SIGNALS)
      @children.concat(@old_generation)
      run_hooks(:before_fork)
      @config.workers.times { |index| spawn_worker(index) }
      supervise
    ensure
      @signals&.close
    end

    private

    def supervise
      loop do
        names, ready = @signals.wait(1, @children.filter_map(&:reader))
        read_heartbeats(ready)
        return 1 unless reap

        announce_booted
        check_health
        advance_phased_restart
        names.each do |name|
          case name
          when "TERM", "INT" then return stop_all
          when "USR2" then hot_restart
          when "USR1" then start_phased_restart
          when "TTIN" then spawn_worker(next_index)
          when "TTOU" then retire_one
          when "HUP" then reopen_logs
          end
        end
      end
    end

    def spawn_worker(index)
      # Made here, before the fork, so the master holds the slot's sockets:
      # one opened in the child would die with it, queue and all.
      sockets = @listeners.slot(index)
      reader, writer = IO.pipe
      master = Process.pid
      pid = Process.fork do
        @signals.close
        @children.each { |child| child.reader&.close }
        reader.close
        @listeners.keep_only(index)
        run_child(index, sockets, writer, master)
      end
      writer.close
      now = monotonic
      @children << Child.new(index: index, pid: pid, started_at: now, reader: reader, last_seen: now, booted: false)
      @log.call("worker #{index} started (pid #{pid})")
    end

    # Runs in the forked child. It ends the way a forked Puma worker does,
    # through `exit`: at_exit handlers run and $stdout is flushed (APM and
    # log flushes), and since this is a fork block the child exits there and
    # never returns into the master's code.
    def run_child(index, sockets, heartbeat, master)
      monitor = WorkerMonitor.new(signals: %w[HUP TTIN TTOU USR1 USR2], interval: heartbeat_interval,
                                  heartbeat: heartbeat, master_pid: master,
                                  on_signal: ->(name, _) { LogFiles.reopen(@config.stdout_redirect) if name == "HUP" })
      @config.on_worker_boot << ->(_) { monitor.booted! }
      worker = @build_worker.call(index, sockets)
      monitor.start(worker)
      worker.run
      exit(0)
    rescue SystemExit
      raise
    rescue Hyperion::Error => e
      warn "hyperion: worker #{index}: #{e.message}"
      exit(1)
    rescue Exception => e # rubocop:disable Lint/RescueException -- report anything that ends a worker, then exit
      warn "hyperion: worker #{index}: #{e.class}: #{e.message}"
      exit(1)
    end

    def heartbeat_interval = [Float(@config.worker_timeout) / 4, 5.0].min

    def read_heartbeats(ready)
      ready.each do |reader|
        child = @children.find { |c| c.reader == reader }
        data = reader.read_nonblock(4096, exception: false)
        next if data == :wait_readable

        if data.nil? # the child closed its end: it is exiting; reap decides
          reader.close
          child.reader = nil if child
          next
        end
        next unless child

        child.last_seen = monotonic
        child.booted ||= data.include?("b")
      end
    end

    # Collects dead workers and refills their slots. False when workers keep
    # dying at boot and the master should give up.
    def reap
      while (pid, status = Process.wait2(-1, Process::WNOHANG))
        child = @children.find { |c| c.pid == pid }
        next unless child

        @children.delete(child)
        child.reader&.close
        next if child_retired(child)

        quick = !child.booted && monotonic - child.started_at < QUICK_DEATH
        @quick_deaths = quick ? @quick_deaths + 1 : 0
        if @quick_deaths >= MAX_QUICK_DEATHS
          @log.call("workers keep dying at boot (#{@quick_deaths} in a row, last #{status.inspect}); giving up")
          stop_all
          return false
        end
        @log.call("worker #{child.index} (pid #{pid}) died (#{status.inspect}); restarting it")
        sleep(2**(@quick_deaths - 1) * 0.5) if quick # back off while they crash at boot
        refill(child)
      end
      true
    rescue Errno::ECHILD
      true
    end

    def refill(dead)
      replaced = @replacing[dead.index]
      if replaced.nil?
        spawn_worker(dead.index) unless live_worker?(dead.index)
      elsif replaced.pid == dead.pid # died before its replacement served
        @replacing.delete(dead.index)
        spawn_worker(dead.index) unless live_worker?(dead.index)
      else # the replacement died; try again
        spawn_worker(dead.index)
      end
    end

    # True when the dead child was on its way out anyway.
    def child_retired(child)
      return false unless child.retiring? || child.index.nil?

      @log.call("#{child.index ? "worker #{child.index}" : 'old worker'} (pid #{child.pid}) left")
      @replacing.delete(child.index) if @replacing[child.index]&.pid == child.pid
      close_unserved_slots
      true
    end

    # A slot socket nobody accepts from would hold connections forever: after
    # TTOU, or after a hot restart to fewer workers than the image before had.
    def close_unserved_slots
      @listeners.slot_indices.each { |index| @listeners.close_slot(index) unless live_worker?(index) }
    end

    def live_worker?(index)
      @children.any? { |c| c.index == index && !c.retiring? }
    end

    def active_children = @children.select { |c| c.index && !c.retiring? }

    # Once every slot serves: on_booted (first time), READY=1, and the
    # workers of the previous image (after a hot restart) are told to leave.
    def announce_booted
      return if @booted_once
      return unless (0...@config.workers).all? { |i| @children.any? { |c| c.index == i && c.booted } }

      @booted_once = true
      @log.call("all #{@config.workers} workers serving")
      run_hooks(:on_booted)
      Systemd.notify("READY=1\nSTATUS=#{@config.workers} workers serving\nMAINPID=#{Process.pid}")
      @old_generation.each { |old| retire(old, "the hot restart is done") }
    end

    # Kills workers with no heartbeat for worker_timeout, and recycles those
    # above worker_max_rss_mb or past their drain deadline.
    def check_health
      now = monotonic
      @children.each do |child|
        if child.retiring?
          if now - child.retired_at > Float(@config.graceful_timeout) + 5
            @log.call("worker #{child.index} (pid #{child.pid}) did not drain in time; killing it")
            signal(child.pid, "KILL")
          end
        elsif child.index && now - child.last_seen > Float(@config.worker_timeout)
          @log.call("worker #{child.index} (pid #{child.pid}) sent no heartbeat for #{@config.worker_timeout} s; " \
                    "killing it")
          signal(child.pid, "KILL")
          child.last_seen = now # once; reap replaces it
        elsif child.index && child.booted && @config.worker_max_rss_mb && !@replacing.key?(child.index) &&
              (rss = rss_mb(child.pid)) && rss > @config.worker_max_rss_mb
          @log.call("worker #{child.index} (pid #{child.pid}) uses #{rss} MB > worker_max_rss_mb " \
                    "#{@config.worker_max_rss_mb}; replacing it")
          replace(child.index)
        end
      end
    end

    def rss_mb(pid)
      kb = File.read("/proc/#{pid}/status")[/^VmRSS:\s+(\d+)/, 1]
      kb && Integer(kb) / 1024
    rescue SystemCallError
      nil
    end

    # Starts a new worker for `index`; the old one is told to drain once the
    # new one serves (advance_replacements).
    def replace(index)
      old = @children.find { |c| c.index == index && !c.retiring? }
      return spawn_worker(index) unless old

      @replacing[index] = old
      spawn_worker(index)
    end

    def start_phased_restart
      if @config.preload_app
        @log.call("phased restart: workers are replaced one at a time; with preload_app! they fork from this " \
                  "master and keep the code it loaded (send USR2 to load new code)")
      else
        @log.call("phased restart: workers are replaced one at a time and each loads the app afresh")
      end
      @phased = active_children.map(&:index).sort
    end

    def advance_phased_restart
      @replacing.each do |index, old|
        next if old.retiring?

        fresh = @children.find { |c| c.index == index && c.pid != old.pid && !c.retiring? }
        retire(old, "its replacement serves") if fresh&.booted
      end
      return if @phased.empty? || !@replacing.empty?

      replace(@phased.shift)
    end

    def retire(child, why)
      child.retired_at = monotonic
      @log.call("#{child.index ? "worker #{child.index}" : 'old worker'} (pid #{child.pid}) draining: #{why}")
      signal(child.pid, "TERM")
    end

    def retire_one
      return if active_children.size <= 1

      retire(active_children.max_by(&:index), "TTOU")
    end

    def next_index
      (0..).find { |i| !live_worker?(i) }
    end

    # USR2: run on_restart, then exec this same command line with the
    # listening sockets and the list of current workers; the new image forks
    # its workers and retires these once they all serve. On failure the
    # current image keeps serving.
    def hot_restart
      return unless @restarter.check

      @restarter.announce(@config)
      @log.call("hot restart: re-executing with the listening sockets")
      env, redirects = @listeners.inheritance
      env[OLD_WORKERS_ENV] = @children.map(&:pid).join(",")
      @restarter.exec(env, redirects)
    rescue SystemCallError => e
      @log.call("hot restart failed (#{e.message}); the current workers keep serving")
      Systemd.notify("READY=1")
    end

    def reopen_logs
      LogFiles.reopen(@config.stdout_redirect)
      @log.call("reopened the log files") if @config.stdout_redirect
      @children.each { |child| signal(child.pid, "HUP") }
    end

    # TERM to every worker, wait graceful_timeout (+ STOP_SLACK), KILL what is left.
    def stop_all
      Systemd.notify("STOPPING=1")
      pids = @children.map(&:pid)
      pids.each { |pid| signal(pid, "TERM") }
      deadline = monotonic + Float(@config.graceful_timeout) + STOP_SLACK
      pids.each do |pid|
        remaining = deadline - monotonic
        next if remaining.positive? && wait_for(pid, remaining)

        signal(pid, "KILL")
        begin
          Process.wait(pid)
        rescue Errno::ECHILD
          nil
        end
      end
      @children.clear
      0
    end

    def wait_for(pid, seconds)
      until seconds <= 0
        return true if Process.wait(pid, Process::WNOHANG)

        sleep 0.05
        seconds -= 0.05
      end
      false
    rescue Errno::ECHILD
      true
    end

    def signal(pid, name)
      Process.kill(name, pid)
    rescue Errno::ESRCH
      nil
    end

    def run_hooks(name) = @config.run_hooks(name, @log)

    def monotonic = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end
end
