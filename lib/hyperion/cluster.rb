# frozen_string_literal: true

require "socket"

module Hyperion
  # The master of `workers N` (N > 1): forks workers from Ruby (no tokio
  # runtime exists here before a fork), keeps each index slot filled, and
  # turns signals into actions. Trap handlers only queue the signal name.
  #
  # Listener models: :reuseport (Linux default) lets every worker bind its
  # own SO_REUSEPORT socket and the kernel balance; :share binds once here and
  # the workers inherit the socket. HYPERION_WORKER_MODEL picks one.
  class Cluster
    SIGNALS = %w[TERM INT TTIN TTOU CHLD].freeze
    # A worker that dies sooner than this after its start counts as a crash
    # at boot; that many in a row make the master give up.
    QUICK_DEATH = 5.0
    MAX_QUICK_DEATHS = 5

    def initialize(config:, bind:, model:, build_worker:, log:)
      @config = config
      @bind = bind
      @model = model
      @build_worker = build_worker # ->(index, listener_or_nil, port) { Worker }
      @log = log
      @workers = {} # index => [pid, started_at]
      @signals = [] # names queued by the traps, handled by #supervise
      @wake_reader, @wake_writer = IO.pipe
      @quick_deaths = 0
    end

    # Returns the exit status.
    def run(listener)
      @listener = listener
      @port = listener.respond_to?(:local_address) && listener.local_address.ip? ? listener.local_address.ip_port : 0
      if @model == :reuseport
        # Keep the port reserved (bound, not listening) without joining the
        # accept group; workers bind their own SO_REUSEPORT sockets.
        @listener.close
        @listener = nil
        @reservation = reserve_port(@bind.host, @port)
      end
      previous = SIGNALS.to_h do |name|
        [name, Signal.trap(name) do
          @signals << name
          @wake_writer.write_nonblock(".", exception: false)
        end]
      end
      @config.before_fork.each { |hook| call_hook(:before_fork, hook) }
      @config.workers.times { |index| spawn_worker(index) }
      @config.on_booted.each { |hook| call_hook(:on_booted, hook) }
      supervise
    ensure
      previous&.each { |name, handler| Signal.trap(name, handler || "DEFAULT") }
      @reservation&.close
    end

    private

    def supervise
      loop do
        @wake_reader.wait_readable(1)
        @wake_reader.read_nonblock(64, exception: false)
        # A CHLD can be missed while another is handled; reaping every turn
        # (WNOHANG) costs nothing and catches it.
        return 1 unless reap

        while (name = @signals.shift)
          case name
          when "TERM", "INT" then return stop_all
          when "TTIN" then spawn_worker(next_index)
          when "TTOU" then retire_one
          end
        end
      end
    end

    def spawn_worker(index)
      listener = @listener
      pid = Process.fork do
        SIGNALS.each { |name| Signal.trap(name, "DEFAULT") }
        @reservation&.close
        @build_worker.call(index, listener, @port).run
        exit!(0)
      rescue Hyperion::Error => e
        warn "hyperion: worker #{index}: #{e.message}"
        exit!(1)
      end
      @workers[index] = [pid, monotonic]
      @log.call("worker #{index} started (pid #{pid})")
    end

    # Collects dead workers and refills their slots. False when workers keep
    # dying at boot and the master should give up.
    def reap
      while (pid, status = Process.wait2(-1, Process::WNOHANG))
        index, (_, started) = @workers.find { |_, (p, _)| p == pid }
        next unless index

        @workers.delete(index)
        next if @retiring&.delete(pid)

        quick = monotonic - started < QUICK_DEATH
        @quick_deaths = quick ? @quick_deaths + 1 : 0
        if @quick_deaths >= MAX_QUICK_DEATHS
          @log.call("workers keep dying at boot (#{@quick_deaths} in a row, last #{status.inspect}); giving up")
          stop_all
          return false
        end
        @log.call("worker #{index} (pid #{pid}) died (#{status.inspect}); restarting it")
        sleep(2**(@quick_deaths - 1) * 0.5) if quick # back off while they crash at boot
        spawn_worker(index)
      end
      true
    rescue Errno::ECHILD
      true
    end

    def retire_one
      return if @workers.size <= 1

      index = @workers.keys.max
      pid, = @workers[index]
      (@retiring ||= []) << pid
      Process.kill("TERM", pid)
      @log.call("worker #{index} (pid #{pid}) retiring (TTOU)")
    rescue Errno::ESRCH
      nil
    end

    def next_index
      (0..).find { |i| !@workers.key?(i) }
    end

    # TERM to every worker, wait graceful_timeout, KILL what is left.
    def stop_all
      pids = @workers.values.map(&:first)
      pids.each { |pid| signal(pid, "TERM") }
      deadline = monotonic + Float(@config.graceful_timeout) + 1
      pids.each do |pid|
        remaining = deadline - monotonic
        waited = remaining.positive? && wait_for(pid, remaining)
        next if waited

        signal(pid, "KILL")
        begin
          Process.wait(pid)
        rescue Errno::ECHILD
          nil
        end
      end
      @workers.clear
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

    def call_hook(name, hook)
      hook.call
    rescue StandardError => e
      @log.call("#{name} hook raised #{e.class}: #{e.message}")
    end

    def reserve_port(host, port)
      socket = Socket.new(host.include?(":") ? :INET6 : :INET, :STREAM)
      socket.setsockopt(:SOCKET, :REUSEADDR, true)
      socket.setsockopt(:SOCKET, :REUSEPORT, true)
      socket.bind(Addrinfo.tcp(host, port))
      @port = socket.local_address.ip_port
      socket
    end

    def monotonic = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end
end
