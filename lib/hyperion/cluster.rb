# frozen_string_literal: true

require "time"
require "hyperion/signal_queue"
require "hyperion/worker_monitor"
require "hyperion/log_files"
require "hyperion/systemd"
require "hyperion/control_server"

module Hyperion
  # The master of `workers N` (N > 1). It forks workers from Ruby (no tokio
  # runtime exists here before a fork), keeps every index slot filled, listens
  # to their heartbeats and turns signals into actions; trap handlers only
  # queue the signal's name (see SignalQueue).
  #
  # The master holds every listening socket (see Listeners) for its whole
  # life, so a worker that stops, dies or is replaced leaves its queued
  # connections to the next worker of its slot instead of resetting them.
  #
  # The master never creates a Worker or a tokio runtime: forking a process
  # whose runtime threads hold locks is unsafe. Its stats come from one
  # StatsPage per worker, a page of shared memory mapped here before the
  # fork, which the worker writes and the master reads; the control listener
  # (when configured) is a Ruby thread of the master (ControlServer).
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
    # image before a hot restart (it has no stats page here). `stats` is its
    # StatsPage; `phase` counts phased restarts, as Puma's does.
    Child = Struct.new(:index, :pid, :started_at, :reader, :last_seen, :booted, :retired_at, :stats, :phase,
                       :started_wall, :last_checkin, keyword_init: true) do
      def retiring? = !retired_at.nil?
    end

    # build_worker: ->(index, sockets, extras) { Hyperion::Worker }, called
    # in the child. restarter: a Restarter, for USR2. control: opened
    # Control::Settings, or nil.
    def initialize(config:, listeners:, build_worker:, restarter:, log:, control: nil, env: ENV)
      @config = config
      @listeners = listeners
      @build_worker = build_worker
      @restarter = restarter
      @log = log
      @control = control
      @children = []
      @quick_deaths = 0
      @phased = [] # slot indices still to replace in a phased restart
      @replacing = {} # slot index => the Child being replaced
      @booted_once = false
      @phase = 0
      @boots = 0
      @restarts = 0
      @draining_until = nil # drain_delay: when the TERM's delay ends
      @started_wall = Time.now
      @old_generation = env.delete(OLD_WORKERS_ENV).to_s.split(",").map do |pid|
        Child.new(pid: Integer(pid), started_at: monotonic, last_seen: monotonic, booted: true, phase: -1,
                  started_wall: Time.now, last_checkin: Time.now)
      end
    end

    # Returns the exit status.
    def run
      @signals = SignalQueue.new(SIGNALS)
      @retired_stats = StatsPage.new # the counters of workers that are gone
      @stats_lock = Mutex.new
      Hyperion.stats_object = self
      @control_server = ControlServer.new(@control, responder: method(:control_answer), log: @log).start if @control
      @children.concat(@old_generation)
      run_hooks(:before_fork)
      @config.workers.times { |index| spawn_worker(index) }
      supervise
    ensure
      @control_server&.stop
      @signals&.close
    end

    # Puma's cluster stats (Puma.stats_hash in the master).
    def stats
      children = @children.dup
      {
        started_at: @started_wall.utc.iso8601,
        workers: children.size,
        phase: @phase,
        booted_workers: children.count(&:booted),
        old_workers: children.count { |c| c.index.nil? || c.retiring? || c.phase != @phase },
        worker_status: children.map do |c|
          { started_at: c.started_wall.utc.iso8601, pid: c.pid, index: c.index, phase: c.phase, booted: c.booted,
            last_checkin: c.last_checkin.utc.iso8601, last_status: c.booted && c.stats ? c.stats.status : {} }
        end
      }
    end

    private

    def supervise
      loop do
        names, ready = @signals.wait(wait_timeout, @children.filter_map(&:reader))
        read_heartbeats(ready)
        return 1 unless reap
        return stop_all if @draining_until && monotonic >= @draining_until

        announce_booted
        check_health
        advance_phased_restart
        names.each do |name|
          case name
          when "TERM" then return stop_all unless begin_drain_delay
          when "INT" then return stop_all
          when "HALT" then return halt_all
          when "USR2" then hot_restart
          when "USR1" then start_phased_restart
          when "TTIN" then spawn_worker(next_index)
          when "TTOU" then retire_one
          when "HUP" then reopen_logs
          end
        end
      end
    end

    def wait_timeout
      return 1 unless @draining_until

      (@draining_until - monotonic).clamp(0, 1)
    end

    # drain_delay: the first TERM keeps the workers serving while /ready
    # answers 503; the stop follows when the delay ends. False when there
    # is no delay, or this is a second TERM (then stop at once).
    def begin_drain_delay
      delay = Float(@config.drain_delay || 0)
      return false if delay <= 0 || @draining_until

      Systemd.notify("STOPPING=1")
      @log.call("stop requested: serving #{delay} s more (drain_delay) while /ready answers 503")
      @draining_until = monotonic + delay
      true
    end

    def spawn_worker(index, replacing: false)
      # Made here, before the fork, so the master holds the slot's sockets:
      # one opened in the child would die with it, queue and all. The stats
      # page too: it is the memory the master and the worker share.
      sockets = @listeners.slot(index)
      page = StatsPage.new
      reader, writer = IO.pipe
      master = Process.pid
      pid = Process.fork do
        @signals.close
        @control_server&.close_in_child
        @children.each { |child| child.reader&.close }
        reader.close
        @listeners.keep_only(index)
        run_child(index, sockets, writer, master, page)
      end
      writer.close
      now = monotonic
      @restarts += 1 if replacing
      @children << Child.new(index: index, pid: pid, started_at: now, reader: reader, last_seen: now, booted: false,
                             stats: page, phase: @phase, started_wall: Time.now, last_checkin: Time.now)
      @log.call("worker #{index} started (pid #{pid})")
    end

    # Runs in the forked child. It ends the way a forked Puma worker does,
    # through `exit`: at_exit handlers run and $stdout is flushed (APM and
    # log flushes), and since this is a fork block the child exits there and
    # never returns into the master's code.
    def run_child(index, sockets, heartbeat, master, page)
      monitor = WorkerMonitor.new(signals: %w[HUP TTIN TTOU USR1 USR2], interval: heartbeat_interval,
                                  heartbeat: heartbeat, master_pid: master,
                                  on_signal: ->(name, _) { LogFiles.reopen(@config.stdout_redirect) if name == "HUP" })
      @config.on_worker_boot << ->(_) { monitor.booted! }
      worker = @build_worker.call(index, sockets, { stats: page })
      Hyperion.stats_object = worker
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
        child.last_checkin = Time.now
        if !child.booted && data.include?("b")
          child.booted = true
          @boots += 1
        end
      end
    end

    # Collects dead workers and refills their slots. False when workers keep
    # dying at boot and the master should give up.
    def reap
      while (pid, status = Process.wait2(-1, Process::WNOHANG))
        child = @children.find { |c| c.pid == pid }
        next unless child

        # One step for /metrics (another thread): the worker's counters move
        # to the totals as it leaves the list, never counted twice or not at all.
        @stats_lock.synchronize do
          @children.delete(child)
          @retired_stats.absorb(child.stats) if child.stats
        end
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
        spawn_worker(dead.index, replacing: true) unless live_worker?(dead.index)
      elsif replaced.pid == dead.pid # died before its replacement served
        @replacing.delete(dead.index)
        spawn_worker(dead.index, replacing: true) unless live_worker?(dead.index)
      else # the replacement died; try again
        spawn_worker(dead.index, replacing: true)
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
      spawn_worker(index, replacing: true)
    end

    def start_phased_restart
      if @config.preload_app
        @log.call("phased restart: workers are replaced one at a time; with preload_app! they fork from this " \
                  "master and keep the code it loaded (send USR2 to load new code)")
      else
        @log.call("phased restart: workers are replaced one at a time and each loads the app afresh")
      end
      @phase += 1
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

    # /halt: KILL every worker and leave at once.
    def halt_all
      @log.call("halt: killing the workers without draining")
      @stopping = true
      @children.each { |child| signal(child.pid, "KILL") }
      @children.each do |child|
        Process.wait(child.pid)
      rescue Errno::ECHILD
        nil
      end
      @children.clear
      0
    end

    # The control listener's answers (see ControlServer): [status,
    # content_type, body, after].
    def control_answer(name)
      case name
      when "stats" then [200, "application/json", JSON.generate(stats), nil]
      when "metrics"
        text = @stats_lock.synchronize do
          children = @children.dup
          pages = children.filter_map(&:stats) + [@retired_stats]
          StatsPage.prometheus(pages, children.count(&:index), children.count { |c| c.index && c.booted },
                               @boots, @restarts)
        end
        [200, "text/plain; version=0.0.4; charset=utf-8", text, nil]
      when "ready"
        ready = !@stopping && @draining_until.nil? && @children.dup.any? { |c| c.index && c.booted && !c.retiring? }
        if ready then [200, "application/json", '{"status":"ready"}', nil]
        else [503, "application/json", %({"status":"#{@draining_until || @stopping ? 'draining' : 'booting'}"}), nil]
        end
      else
        status, body, after = control_commands.call(name)
        [status, "application/json", body, after]
      end
    end

    # The commands queue the signal's name for the master loop, which acts
    # as for the signal (stop honours drain_delay; halt has no signal).
    def control_commands
      @control_commands ||= Control::Commands.new(
        restart: -> { @signals.push("USR2") }, phased_restart: -> { @signals.push("USR1") },
        stop: -> { @signals.push("TERM") }, halt: -> { @signals.push("HALT") }
      )
    end

    # TERM to every worker, wait graceful_timeout (+ STOP_SLACK), KILL what is left.
    def stop_all
      @stopping = true
      Systemd.notify("STOPPING=1") unless @draining_until
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
